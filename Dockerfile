# syntax=docker/dockerfile:1
# Dataflow worker image for pathembed (`pathembed launch --image ...`, README "Cloud outputs
# and Dataflow"): Beam's Python 3.11 SDK image of the Beam version pinned in pyproject.toml,
# TensorFlow with CUDA, and this project installed, so nothing is staged at job start
# (--sdk_location container). tests/test_dockerfile.py checks the pins; build and push:
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/pathembed:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/pathembed:0.1.0
FROM apache/beam_python3.11_sdk:2.77.0

# TF_FORCE_GPU_ALLOW_GROWTH: Dataflow runs several SDK processes per worker, each loading its
# own model; by default TensorFlow's first process would reserve the whole GPU's memory.
ENV TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/opt/pathembed/huggingface

WORKDIR /opt/pathembed
COPY pyproject.toml requirements.lock README.md ./
COPY pipeline ./pipeline
COPY transforms ./transforms
COPY models ./models
COPY configs ./configs
COPY scripts ./scripts

# The `gpu` extra (pyproject.toml): the CUDA build of the pinned TensorFlow (NVIDIA's CUDA/cuDNN
# wheels; Dataflow installs the driver: install-nvidia-driver in the resource hint) and
# nvImageCodec for GPU frame decoding. Every other package is held to requirements.lock, so
# workers run what the tests ran. The same command on a local GPU machine: README, "GPU".
RUN pip install -c requirements.lock '.[gpu]' \
 && python -c "import apache_beam, tensorflow; from nvidia import nvimgcodec; print(apache_beam.__version__, tensorflow.__version__)"

# Optional: bake gated Hugging Face weights into the image, so workers need no token; pass the
# commit that configs/idc.yaml pins (model.revision): each worker checks that the snapshot it
# loads is the one the run records (models/handler.py), so the image must hold that commit:
#   docker build --secret id=hf_token,env=HF_TOKEN --build-arg PREFETCH_MODEL=google/path-foundation \
#     --build-arg PREFETCH_REVISION=<40-hex commit> .
ARG PREFETCH_MODEL=""
ARG PREFETCH_REVISION="main"
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -n "$PREFETCH_MODEL" ]; then \
      HF_TOKEN="$(cat /run/secrets/hf_token)" python -c \
        "import sys, huggingface_hub; huggingface_hub.snapshot_download(sys.argv[1], revision=sys.argv[2])" \
        "$PREFETCH_MODEL" "$PREFETCH_REVISION"; \
    fi

# The Beam SDK harness: Dataflow starts workers through the base image's boot program.
ENTRYPOINT ["/opt/apache/beam/boot"]
