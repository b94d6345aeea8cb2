# syntax=docker/dockerfile:1
#
# lora-serve container images. ONE Dockerfile, TWO final targets (choose with --target):
#
#   docker build --target gpu -t lora-serve:gpu .   # CUDA 11.8 + cuDNN 8, @tensorflow/tfjs-node-gpu, --backend tensorflow-gpu
#   docker build --target cpu -t lora-serve:cpu .   # node:20-bookworm-slim, wasm backend + the native matmul addon
#   docker build --target cpu --build-arg TFJS_NODE=1 --build-arg CPU_BACKEND=tensorflow -t lora-serve:cpu-native .
#                                                   # cpu + @tensorflow/tfjs-node (native libtensorflow 2.9.1 on the CPU)
#   docker build --target webgpu -t lora-serve:webgpu .   # node:20-bookworm-slim + the Vulkan loader, --backend webgpu
#                                                   # (TensorFlow.js's WebGPU backend on Dawn; no CUDA in the image)
#
# `docker build .` without --target builds the LAST stage, which is `gpu`.
#
# Why CUDA 11.8 + cuDNN 8: @tensorflow/tfjs-node-gpu@4.22.0 downloads libtensorflow 2.9.1
# (scripts/deps-constants.js: LIBTENSORFLOW_VERSION = '2.9.1'), and tfjs-node's README asks for
# "CUDA Toolkit 11.2, cuDNN SDK 8.1.0, NVIDIA driver > 450.x" (TensorFlow 2.9's tested build
# configuration). libtensorflow dlopen()s the CUDA 11 / cuDNN 8 libraries by their major-version
# sonames (libcudart.so.11.0, libcublas.so.11, libcudnn.so.8, ...), so any CUDA 11.x >= 11.2 runtime
# with cuDNN 8 satisfies it. 11.8 (the last CUDA 11) is the first whose cuBLAS and cuDNN 8.x know
# Hopper (H100/H200); it needs a host driver that supports CUDA 11.8 (>= 520). For the exact tested
# pair, build with --build-arg CUDA_IMAGE=nvidia/cuda:11.2.2-cudnn8-runtime-ubuntu20.04 .
# CUDA 12 images do NOT work (libtensorflow 2.9 wants the .so.11 libraries).
# TensorFlow 2.9's own kernels are compiled up to compute capability 8.0 (+ PTX): on newer GPUs
# the driver JIT-compiles them on first use, so the first requests after a start are slow; the
# compute cache (CUDA_CACHE_PATH, a volume in docker/compose.yaml) keeps the result across restarts.
#
# All images: non-root user `lora` (uid 10001), port 3000, LORA_SERVE_HOST=0.0.0.0, volumes /models
# (read-only checkpoints: set LORA_SERVE_MODEL=/models/<name>; unset = the embedded demo model) and
# /adapters (LORA_SERVE_ADAPTER_DIR; uploads and the demo adapters are written there, so it must be
# writable by uid 10001), tini as PID 1 (forwards SIGTERM so the server drains within
# --shutdown-grace), and a HEALTHCHECK that uses node's fetch (no curl in the images).
# Every server option is an environment variable LORA_SERVE_<FLAG_IN_UPPER_SNAKE> (src/cli.ts), or a flag:
# the server is the ENTRYPOINT, so `docker run IMAGE --max-batch-size 8` passes flags to it (CMD is empty).
# The backend is set by LORA_SERVE_BACKEND so `-e LORA_SERVE_BACKEND=...` (or `--backend`) works.
# `npm ci --omit=dev` keeps tsx, a runtime dependency: the server runs TypeScript through it. Its install script builds
# the native matmul addon (src/backend/wasm/addon, node-gyp: python3, make, g++ in the deps stages); the final stages copy only
# the build output (an empty folder where the build failed, e.g. on arm64). On a CPU without AVX2/FMA (or where the build failed) the server uses the wasm kernels.

ARG NODE_IMAGE=node:20-bookworm-slim
ARG CUDA_IMAGE=nvidia/cuda:11.8.0-cudnn8-runtime-ubuntu22.04
ARG TFJS_VERSION=4.22.0

# ---------------------------------------------------------------------------------------------
# Node.js 20 distribution, copied into the CUDA (Ubuntu) images: the official binaries need glibc >= 2.28.
FROM ${NODE_IMAGE} AS node

# ---------------------------------------------------------------------------------------------
# CPU dependencies: production node_modules (+ @tensorflow/tfjs-node when TFJS_NODE=1).
FROM ${NODE_IMAGE} AS cpu-deps
ARG TFJS_VERSION
ARG TFJS_NODE=0
WORKDIR /app
# Build tools: for the native matmul addon, and for tfjs-node when its prebuilt addon cannot be downloaded.
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
COPY src/backend/wasm/addon ./src/backend/wasm/addon
# Dawn (npm webgpu) ships dawn.node for five platforms; the image keeps the Linux ones.
RUN npm ci --omit=dev --no-audit --no-fund \
    && rm -rf node_modules/webgpu/dist/darwin-* node_modules/webgpu/dist/win32-* \
    && mkdir -p src/backend/wasm/addon/build/Release \
    && if [ "$TFJS_NODE" = "1" ]; then \
         npm install --no-save --omit=dev --no-audit --no-fund "@tensorflow/tfjs-node@${TFJS_VERSION}" \
         && ls node_modules/@tensorflow/tfjs-node/deps/lib/libtensorflow.so.2* \
               node_modules/@tensorflow/tfjs-node/lib/napi-v*/tfjs_binding.node; \
       fi \
    && npm cache clean --force

# ---------------------------------------------------------------------------------------------
# GPU dependencies: production node_modules + @tensorflow/tfjs-node-gpu, whose install script downloads
# libtensorflow-gpu-linux-x86_64-2.9.1 and the prebuilt N-API addon (x86_64 only).
FROM ${CUDA_IMAGE} AS gpu-deps
ARG TFJS_VERSION
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
    && node --version && npm --version
WORKDIR /app
COPY package.json package-lock.json ./
COPY src/backend/wasm/addon ./src/backend/wasm/addon
# The last line fails the build when the install script did not run (e.g. an npm that skips unapproved
# install scripts): libtensorflow sits in deps/lib, the addon (rpath ../../deps/lib) in lib/napi-v*/.
RUN npm ci --omit=dev --no-audit --no-fund \
    && rm -rf node_modules/webgpu/dist/darwin-* node_modules/webgpu/dist/win32-* \
    && mkdir -p src/backend/wasm/addon/build/Release \
    && npm install --no-save --omit=dev --no-audit --no-fund "@tensorflow/tfjs-node-gpu@${TFJS_VERSION}" \
    && npm cache clean --force \
    && ls node_modules/@tensorflow/tfjs-node-gpu/deps/lib/libtensorflow.so.2* \
          node_modules/@tensorflow/tfjs-node-gpu/lib/napi-v*/tfjs_binding.node

# ---------------------------------------------------------------------------------------------
# CPU image: wasm backend by default; with TFJS_NODE=1 also pass CPU_BACKEND=tensorflow (or run with
# -e LORA_SERVE_BACKEND=tensorflow) to use the native build.
FROM ${NODE_IMAGE} AS cpu
ARG CPU_BACKEND=wasm
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lora \
    && useradd --system --uid 10001 --gid lora --home-dir /home/lora --create-home --shell /usr/sbin/nologin lora \
    && mkdir -p /app/.cache /models /adapters /hf-home \
    && chown lora:lora /app/.cache /adapters /hf-home
WORKDIR /app
COPY --from=cpu-deps /app/node_modules ./node_modules
COPY package.json package-lock.json tsconfig.json ./
COPY src ./src
COPY --from=cpu-deps /app/src/backend/wasm/addon/build/Release ./src/backend/wasm/addon/build/Release
ENV NODE_ENV=production \
    LORA_SERVE_HOST=0.0.0.0 \
    LORA_SERVE_PORT=3000 \
    LORA_SERVE_ADAPTER_DIR=/adapters \
    HF_HOME=/hf-home \
    LORA_SERVE_BACKEND=${CPU_BACKEND}
VOLUME ["/models", "/adapters", "/hf-home"]
EXPOSE 3000
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.LORA_SERVE_PORT||3000)+'/health').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["/usr/bin/tini", "--", "node", "--import", "tsx", "src/server/main.ts"]
CMD []

# ---------------------------------------------------------------------------------------------
# WebGPU image: the cpu image (its production node_modules hold Dawn, npm `webgpu`, and
# @tensorflow/tfjs-backend-webgpu) plus the Vulkan loader, running the webgpu backend on the GPU's Vulkan driver. No
# CUDA: with NVIDIA_DRIVER_CAPABILITIES including `graphics`, the NVIDIA Container Toolkit mounts the driver's Vulkan
# ICD (nvidia_icd.json, libGLX_nvidia.so.0) into the container; libglvnd, which libGLX_nvidia needs, comes from here.
# Run with `docker run --gpus all ...`. Without a Vulkan adapter the server fails at start (BACKEND_UNAVAILABLE).
FROM cpu AS webgpu
USER root
RUN apt-get update && apt-get install -y --no-install-recommends libvulkan1 libglvnd0 libglx0 libegl1 \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o lora -g lora -m 700 /home/lora/run
# XDG_RUNTIME_DIR: Mesa and the Vulkan loader warn without one.
ENV LORA_SERVE_BACKEND=webgpu \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    XDG_RUNTIME_DIR=/home/lora/run
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# GPU image (the default target: last stage). Run with `docker run --gpus all ...` (NVIDIA Container Toolkit).
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lora \
    && useradd --system --uid 10001 --gid lora --home-dir /home/lora --create-home --shell /usr/sbin/nologin lora \
    && mkdir -p /app/.cache /models /adapters /hf-home /var/cache/cuda \
    && chown lora:lora /app/.cache /adapters /hf-home /var/cache/cuda
COPY --from=node /usr/local/bin/node /usr/local/bin/node
WORKDIR /app
COPY --from=gpu-deps /app/node_modules ./node_modules
COPY package.json package-lock.json tsconfig.json ./
COPY src ./src
COPY --from=gpu-deps /app/src/backend/wasm/addon/build/Release ./src/backend/wasm/addon/build/Release
# TF_FORCE_GPU_ALLOW_GROWTH: TensorFlow allocates GPU memory as needed instead of reserving nearly all of it,
# so nvidia-smi and lora_serve_tfjs_memory_bytes tell the truth; set it to false to pre-reserve.
# CUDA_CACHE_*: keeps the PTX JIT results (see the top of this file) in a writable, mountable folder.
ENV NODE_ENV=production \
    LORA_SERVE_HOST=0.0.0.0 \
    LORA_SERVE_PORT=3000 \
    LORA_SERVE_ADAPTER_DIR=/adapters \
    HF_HOME=/hf-home \
    LORA_SERVE_BACKEND=tensorflow-gpu \
    TF_CPP_MIN_LOG_LEVEL=1 \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    CUDA_CACHE_PATH=/var/cache/cuda \
    CUDA_CACHE_MAXSIZE=4294967296
VOLUME ["/models", "/adapters", "/hf-home"]
EXPOSE 3000
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.LORA_SERVE_PORT||3000)+'/health').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["/usr/bin/tini", "--", "node", "--import", "tsx", "src/server/main.ts"]
CMD []
