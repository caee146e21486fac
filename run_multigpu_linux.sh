#!/usr/bin/env bash
# Multi-GPU training with torchrun (DistributedDataParallel, NCCL backend) on Linux.
#
# One machine, all its GPUs:
#   DATA_PATH=/data/artists OUTPUT_DIR=runs/lsnet_t ./run_multigpu_linux.sh
# Extra arguments go to train_artist_style.py:
#   NUM_GPUS=4 MODEL=lsnet_b_artist ./run_multigpu_linux.sh --epochs 100 --feature-dim 512
# Several machines: run this on every node with the same MASTER_ADDR (node 0's address) and its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./run_multigpu_linux.sh    # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 ./run_multigpu_linux.sh    # on node 1
# --batch-size is per GPU: the learning rate is scaled by batch x GPUs x accumulation steps / 512.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DATA_PATH=${DATA_PATH:-dataset}
OUTPUT_DIR=${OUTPUT_DIR:-output/lsnet_t_artist}
MODEL=${MODEL:-lsnet_t_artist}
BATCH_SIZE=${BATCH_SIZE:-128}

if [ "$NUM_GPUS" -lt 1 ]; then
    echo "error: no GPU found (nvidia-smi -L lists none); set NUM_GPUS, or train on one device with" \
         "python train_artist_style.py --device cpu" >&2
    exit 2
fi

if [ "$NNODES" -gt 1 ]; then
    LAUNCH=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
else
    LAUNCH=(--standalone)
fi

exec "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" --nproc_per_node="$NUM_GPUS" train_artist_style.py \
    --data-path "$DATA_PATH" --output-dir "$OUTPUT_DIR" --model "$MODEL" --batch-size "$BATCH_SIZE" "$@"
