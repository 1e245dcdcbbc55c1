"""A real Triton server (pytriton) serving ONNX models on loopback, for tests and benchmarks.

Run it with the Triton venv's interpreter (``scripts/setup-triton-venv.sh``)::

    .venv-triton/bin/python tests/triton_server.py --http-port 8000 --grpc-port 8001 \
        --metrics-port 8002 --model jet_mlp:1=/path/jet_mlp.onnx --ready-file /tmp/ready

Each ``--model NAME:VERSION=PATH`` is bound with ONNX Runtime running inside the
bound Python function, dynamic batching and ``--max-batch-size``. The ONNX
model's first input is the Triton input (``(batch, n_features)`` float32) and
its outputs are the Triton outputs. When every model is loaded the script
writes ``READY <http> <grpc> <metrics>`` to the ready file (atomically) and to
stdout; SIGTERM / SIGINT stop it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

__all__ = ["main"]

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}


def _infer_function(path: Path, threads: int) -> tuple[Any, list[Tensor], list[Tensor]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    model_input = session.get_inputs()[0]
    out_meta = session.get_outputs()
    out_names = [o.name for o in out_meta]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(inputs[model_input.name], dtype=np.float32)
        results = session.run(out_names, {model_input.name: x})
        return dict(zip(out_names, results, strict=True))

    n_features = int(model_input.shape[1])
    inputs = [Tensor(name=model_input.name, dtype=np.float32, shape=(n_features,))]
    outputs = [
        Tensor(name=o.name, dtype=_ORT_TYPES.get(o.type, np.float32), shape=(int(o.shape[1]),))
        for o in out_meta
    ]
    return infer, inputs, outputs


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, bind the models, serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument(
        "--model", action="append", required=True, help="NAME:VERSION=PATH.onnx (repeatable)"
    )
    parser.add_argument("--max-batch-size", type=int, default=4096)
    parser.add_argument("--instances", type=int, default=1, help="model instances (in parallel)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per instance")
    parser.add_argument("--queue-delay-us", type=int, default=100)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument(
        "--workspace",
        type=Path,
        help="a new directory for pytriton's workspace (its model store and server files); "
        "default: one under ~/.cache/pytriton, left behind if the server is killed",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=2,
        log_verbose=0,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config, workspace=args.workspace) as triton:
        for spec in args.model:
            name_version, _, path = spec.partition("=")
            name, _, version = name_version.partition(":")
            funcs = []
            for _ in range(args.instances):
                infer, inputs, outputs = _infer_function(Path(path), args.threads)
                funcs.append(infer)
            triton.bind(
                model_name=name,
                model_version=int(version or 1),
                infer_func=funcs,
                inputs=inputs,
                outputs=outputs,
                config=ModelConfig(
                    max_batch_size=args.max_batch_size,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
                ),
                strict=True,
            )
        triton.run()
        marker = f"READY {args.http_port} {args.grpc_port} {args.metrics_port}"
        if args.ready_file is not None:
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(marker + "\n")
            os.replace(tmp, args.ready_file)
        print(marker, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
