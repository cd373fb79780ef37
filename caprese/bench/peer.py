"""llama.cpp beside our variants: the same weights, the same precision, the same prompts.

A user who wants fast local decoding compares us with llama.cpp, so `caprese bench --peer
llama.cpp` times it in the same run, interleaved with our variants. Same weights: the
built-in models ship as quantized GGUF files that caprese dequantizes (and rounds to bf16)
once; `dense_gguf` writes those very values back into a GGUF, as f32 or bf16, so that both
programs multiply identical matrices. llama.cpp runs in a worker process of its own: its
memory then never counts against our variants' peaks, and it reports its own.

llama-cpp-python is a benchmark-only extra (`pip install 'caprese[peer]'`, compiled from
source for this CPU), kept out of the test install.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from caprese.io import atomic_write
from caprese.models.builtin import assemble_gguf, model_dir

DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def dense_gguf(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Rewrite `source` with every tensor dequantized, rounded to bf16 (as caprese loads
    built-in models) and stored as `dtype` (f32 or bf16); metadata and names unchanged.
    Vectors (norms, biases) stay f32 in a bf16 file, as llama.cpp's own converter keeps
    them: its CPU backend cannot add a bf16 bias to f32 activations. Their values are the
    bf16-rounded ones either way."""
    import gguf
    import numpy as np

    if dtype not in DTYPES:
        raise ValueError(f"llama.cpp is compared in {' or '.join(map(str, DTYPES))}, not {dtype}")
    file_type = (gguf.LlamaFileType.ALL_F32 if dtype == torch.float32
                 else gguf.LlamaFileType.MOSTLY_BF16)
    reader = gguf.GGUFReader(source)

    def stored_f32(tensor) -> bool:
        return dtype == torch.float32 or len(tensor.shape) == 1

    def values(tensor) -> np.ndarray:
        dense = torch.tensor(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        dense = dense.to(torch.bfloat16)
        return dense.float().numpy() if stored_f32(tensor) else dense.view(torch.int16).numpy()

    def write(path: str) -> None:
        architecture = reader.fields["general.architecture"].contents()
        writer = gguf.GGUFWriter(path, architecture)
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue  # the writer adds these itself
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            value = int(file_type) if field.name == "general.file_type" else field.contents()
            writer.add_key_value(field.name, value, kind, sub_type=sub)
        for tensor in reader.tensors:
            shape = [int(n) for n in reversed(tensor.shape)]  # numpy order
            count = int(np.prod(shape))
            f32 = stored_f32(tensor)
            writer.add_tensor_info(
                tensor.name, shape, np.float32 if f32 else np.int16, count * (4 if f32 else 2),
                raw_dtype=gguf.GGMLQuantizationType.F32 if f32 else gguf.GGMLQuantizationType.BF16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(values(tensor))
        writer.close()

    atomic_write(target, write)


def peer_gguf(name: str, dtype: torch.dtype) -> Path:
    """The built-in model `name` as a dense GGUF in `dtype`, built once into its cache folder."""
    target = model_dir(name) / f"peer-{DTYPES.get(dtype, dtype)}.gguf"
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=model_dir(name).parent) as work:
            source = Path(work) / f"{name}.gguf"
            assemble_gguf(name, source, progress=False)
            dense_gguf(source, target, dtype)
    return target


class LlamaCppPeer:
    """A llama.cpp worker process holding one model; `decode` times one greedy run."""

    def __init__(self, gguf_path: Path, threads: int, context: int) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "the llama.cpp peer needs llama-cpp-python: pip install 'caprese[peer]' "
                "(it compiles llama.cpp for this CPU, a few minutes)") from error
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "caprese.bench.peer", str(gguf_path), str(threads),
             str(context)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reply()  # loaded

    def _reply(self) -> dict:
        """The worker's next JSON line; anything else it prints (llama.cpp's own messages, a
        crash's backtrace) goes to stderr."""
        for line in self.worker.stdout:
            if line.startswith("{"):
                return json.loads(line)
            print(line, end="", file=sys.stderr)
        raise RuntimeError(f"the llama.cpp worker exited ({self.worker.wait()}); its error "
                           "is above")

    def decode(self, prompt: list[int], gen_len: int) -> dict:
        """{"tokens", "ttft", "steps", "peak"}: seconds, and the worker's peak RSS above what
        it held before loading the model."""
        self.worker.stdin.write(json.dumps({"prompt": prompt, "gen_len": gen_len}) + "\n")
        self.worker.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.stdin.close()
            self.worker.wait(timeout=60)

    def __enter__(self) -> LlamaCppPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(gguf_path: str, threads: int, context: int) -> None:
    """The worker: load once, then answer one JSON line per run until stdin closes."""
    import llama_cpp
    import numpy as np

    from caprese.bench import memory

    baseline = memory.rss_bytes()
    model = llama_cpp.Llama(model_path=gguf_path, n_ctx=context, n_batch=context,
                            n_ubatch=context, n_threads=threads, n_threads_batch=threads,
                            use_mmap=False, verbose=False)
    print(json.dumps({"loaded": True}), flush=True)

    def greedy() -> int:  # the last position's logits (the only ones llama.cpp keeps)
        logits = llama_cpp.llama_get_logits_ith(model.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(model.n_vocab(),))))

    for line in sys.stdin:
        request = json.loads(line)
        memory.reset_peak()
        model.reset()
        started = time.perf_counter()
        model.eval(request["prompt"])
        token = greedy()
        ttft = time.perf_counter() - started
        tokens, steps = [token], []
        for _ in range(request["gen_len"] - 1):
            started = time.perf_counter()
            model.eval([token])
            token = greedy()
            steps.append(time.perf_counter() - started)
            tokens.append(token)
        peak = memory.peak_bytes()
        print(json.dumps({"tokens": tokens, "ttft": ttft, "steps": steps,
                          "peak": None if peak is None or baseline is None
                          else peak - baseline}), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
