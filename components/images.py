"""The container images the components run in: one setting for the whole pipeline.

Set SFTPIPE_IMAGE_REPOSITORY (registry/repository) and SFTPIPE_IMAGE_TAG when compiling to
point every step at your registry; finetune uses the CUDA variant `<tag>-cuda`.
"""

import os

from sftpipe import __version__

REPOSITORY = os.environ.get("SFTPIPE_IMAGE_REPOSITORY", "ghcr.io/sftpipe/sftpipe")
TAG = os.environ.get("SFTPIPE_IMAGE_TAG", __version__)
CPU_IMAGE = f"{REPOSITORY}:{TAG}"
CUDA_IMAGE = f"{REPOSITORY}:{TAG}-cuda"
