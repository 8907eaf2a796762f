# Image for docker-compose.yml: the same Makefile targets as a developer machine.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends make git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt constraints.txt Makefile ./
# The CPU wheel index keeps pip from pulling the multi-GB CUDA build of torch.
RUN make install VENV=/opt/venv PYTHON=python3 TORCH_PIP_OPTS="--index-url https://download.pytorch.org/whl/cpu"
COPY . .
ENV VENV=/opt/venv NASWEB_HOST=0.0.0.0 PYTHONUNBUFFERED=1
RUN touch /opt/venv/.nasweb-installed
EXPOSE 8000
