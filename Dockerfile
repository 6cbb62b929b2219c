# qan-ray on Ray 2.60: the image that cluster/kuberay/*.yaml run (head, workers and the job
# driver), so no pod installs anything at run time.
#
#   docker build -t ghcr.io/YOUR-ORG/qan-ray:0.1.0 .     # YOUR-ORG: your registry namespace
#   docker push ghcr.io/YOUR-ORG/qan-ray:0.1.0
#
# The base tag's Ray version must equal the `ray[...]==` pin in pyproject.toml and the
# manifests' rayVersion (tests/test_cluster_configs.py checks both). The -gpu variant carries
# CUDA for the GPU worker groups; torch comes from pyproject.toml's dependencies.
FROM rayproject/ray:2.60.0-py311-gpu

# The Ray images run as the non-root user `ray` (uid 1000, group users), who owns the conda
# Python under /home/ray/anaconda3; install into it as that user, and stay that user.
USER ray
WORKDIR /home/ray/qan-ray

# Only what the package needs (the rest is in .dockerignore anyway).
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users qan_ray/ qan_ray/
COPY --chown=ray:users trainables/ trainables/
COPY --chown=ray:users policies/ policies/
RUN pip install --no-cache-dir . && qan --help > /dev/null

WORKDIR /home/ray
