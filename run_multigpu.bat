@echo off
REM Multi-GPU training with torchrun on one Windows machine (DistributedDataParallel with the gloo backend:
REM Windows builds of PyTorch have no NCCL). Run from cmd or PowerShell; extra arguments go to train_artist_style.py:
REM   run_multigpu.bat --epochs 100 --feature-dim 512
REM Settings come from environment variables, e.g. in PowerShell:
REM   $env:NUM_GPUS=2; $env:DATA_PATH="D:\data\artists"; .\run_multigpu.bat
REM --batch-size is per GPU: the learning rate is scaled by batch x GPUs x accumulation steps / 512.
setlocal
cd /d "%~dp0"
if "%PYTHON%"=="" set PYTHON=python
if "%NUM_GPUS%"=="" set NUM_GPUS=2
if "%MASTER_PORT%"=="" set MASTER_PORT=29500
if "%DATA_PATH%"=="" set DATA_PATH=dataset
if "%OUTPUT_DIR%"=="" set OUTPUT_DIR=output\lsnet_t_artist
if "%MODEL%"=="" set MODEL=lsnet_t_artist
if "%BATCH_SIZE%"=="" set BATCH_SIZE=64
if "%NUM_WORKERS%"=="" set NUM_WORKERS=4
REM The TCP store of torch.distributed is built without libuv on Windows.
set USE_LIBUV=0
%PYTHON% -m torch.distributed.run --nnodes=1 --nproc_per_node=%NUM_GPUS% --master_addr=127.0.0.1 --master_port=%MASTER_PORT% train_artist_style.py --data-path "%DATA_PATH%" --output-dir "%OUTPUT_DIR%" --model %MODEL% --batch-size %BATCH_SIZE% --num-workers %NUM_WORKERS% %*
set EXIT_CODE=%ERRORLEVEL%
endlocal & exit /b %EXIT_CODE%
