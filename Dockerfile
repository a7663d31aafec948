# The image of the Docker work pool `diffprune-docker` (prefect.yaml, deployment `nightly-gpu`): a CUDA
# runtime, Python 3.11, torch's CUDA wheels and this checkout installed in /opt/diffprune.
#   docker build -t diffprune:gpu .
#   docker build -t diffprune:gpu --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .     # a driver older than 580
# The Prefect Docker worker starts each flow run in a container of it (`prefect flow-run execute`,
# the command below), with the GPU the work pool's job variables request. See README, "On a GPU,
# in Docker". Not built where it was written (no Docker daemon there, no Docker Hub).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

# torch's CUDA build; its wheel index must name a CUDA the host's driver runs (cu130: driver >= 580)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_ENABLE_TELEMETRY=false

# Python 3.11 (deadsnakes: Ubuntu 22.04's own is 3.10) and git (the pipeline commits in its workspace;
# the workspace is a bind mount owned by another user, hence safe.directory)
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git gnupg software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y software-properties-common && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && git config --system --add safe.directory '*'

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv

# torch from the CUDA index first: `pip install` of the project then finds it satisfied
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/diffprune
# the dependencies in a layer of their own (an empty package stands in for the sources, which change
# more often), then the checkout, installed editable: `diffprune init` reads dvc.yaml and params.yaml
# beside the package, and the deployment's entrypoint (diffprune/flows/pipeline.py) is this copy
COPY pyproject.toml README.md ./
RUN mkdir diffprune && touch diffprune/__init__.py && pip install . && pip uninstall -y diffprune \
 && rm -rf diffprune build ./*.egg-info
COPY diffprune ./diffprune
COPY benchmarks ./benchmarks
COPY dvc.yaml params.yaml params.schema.json prefect.yaml ./
RUN pip install --no-deps -e . && python -c "import diffprune.flows.pipeline"

# the workspaces (`diffprune init` folders) are mounted here; see prefect.yaml's volumes
VOLUME /opt/diffprune/runs
CMD ["prefect", "flow-run", "execute"]
