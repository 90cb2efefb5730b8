"""A throw-away ComfyUI server for integration tests, and a small HTTP client for it.

The server runs from the user's ComfyUI checkout (`COMFYUI_ROOT`) but with `--base-directory`
pointing at a temporary folder, so models, input, output, user data and custom nodes all live
there and the checkout itself is never written to. Only the standard library is used here, so
the test process needs nothing that ComfyUI needs.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PACK_LINK_NAME = "comfyui-lora-trainer"
# Bump when fixtures_builder.py changes what it writes; the cache key includes it.
FIXTURE_VERSION = "tiny-sd15-v3"
CHECKPOINT = "tiny_sd15.safetensors"
UNET_FILE = "tiny_sd15_unet.safetensors"
CLIP_FILE = "tiny_clip_l.safetensors"
VAE_FILE = "tiny_sd15_vae.safetensors"


def comfy_python(comfy_root: Path) -> str:
    """The interpreter that runs ComfyUI: $COMFYUI_PYTHON, else the checkout's venv, else ours."""
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for candidate in (comfy_root / "venv" / "bin" / "python", comfy_root / ".venv" / "bin" / "python"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def cache_root() -> Path:
    base = os.environ.get("LORA_TRAINER_IT_CACHE") or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "lora_trainer_it_cache")
    return Path(base)


def build_fixture_models(comfy_root: Path, python: str, timeout: float = 900) -> Path:
    """Build the tiny SD1.5 files once per FIXTURE_VERSION (shared by parallel sessions via a lock)."""
    target = cache_root() / FIXTURE_VERSION
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{FIXTURE_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "manifest.json").exists():
            return target
        partial = target.parent / f"{FIXTURE_VERSION}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        proc = subprocess.run([python, str(HERE / "fixtures_builder.py"), str(partial)], cwd=comfy_root,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"fixture builder failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        for stale in target.parent.glob("tiny-sd15-*"):  # builds of older fixture versions
            if stale.is_dir() and stale.name != FIXTURE_VERSION:
                shutil.rmtree(stale, ignore_errors=True)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptRejected(Exception):
    """POST /prompt answered 400: validation failed before anything ran."""

    def __init__(self, body: dict):
        self.body = body
        self.error = body.get("error", {})
        self.node_errors = body.get("node_errors", {})
        super().__init__(json.dumps(body, indent=1)[:4000])


@dataclass
class PromptResult:
    prompt_id: str
    status: str                      # "success" | "error"
    outputs: dict = field(default_factory=dict)    # node id -> ui output
    messages: list = field(default_factory=list)   # [[event, data], ...] from history
    log: str = ""                    # server log written while the prompt was queued and ran

    @property
    def error(self) -> dict | None:
        """The execution_error message (node_id, node_type, exception_message, traceback) if any."""
        for event, data in self.messages:
            if event == "execution_error":
                return data
        return None

    def describe(self) -> str:
        err = self.error
        if err is None:
            return f"prompt {self.prompt_id}: {self.status}"
        trace = "".join(err.get("traceback", []))
        return (f"prompt {self.prompt_id} failed in node {err.get('node_id')} ({err.get('node_type')}): "
                f"{err.get('exception_type')}: {err.get('exception_message')}\n{trace}\n--- server log ---\n"
                f"{self.log[-6000:]}")


class ComfyServer:
    """Start, query and stop one ComfyUI server process."""

    def __init__(self, comfy_root: Path, base_dir: Path, python: str, extra_args: list[str] | None = None):
        self.comfy_root = Path(comfy_root)
        self.base_dir = Path(base_dir)
        self.python = python
        self.extra_args = extra_args if extra_args is not None else ["--cpu"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # ---- folders -----------------------------------------------------------------------------
    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    def prepare(self, fixture_dir: Path) -> None:
        """Lay out the base directory: model files (linked from the cache) and our pack as a custom node."""
        for sub in ("input", "output", "temp", "user", "custom_nodes", "models/loras", "models/checkpoints",
                    "models/diffusion_models", "models/text_encoders", "models/vae"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for rel in json.loads((fixture_dir / "manifest.json").read_text())["files"]:
            link = self.models_dir / rel
            if not link.exists():
                link.symlink_to(fixture_dir / rel)
        pack = self.base_dir / "custom_nodes" / PACK_LINK_NAME
        if not pack.exists():
            pack.symlink_to(REPO_ROOT, target_is_directory=True)

    # ---- process -----------------------------------------------------------------------------
    def start(self, timeout: float = 300) -> None:
        cmd = [self.python, "main.py", *self.extra_args, "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base_dir),
               "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
               "--preview-method", "none"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DO_NOT_TRACK="1")
        log = open(self.log_path, "w")
        # Same process group as the tests: an interrupted run (Ctrl+C) stops the server too.
        self.process = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} during start-up:\n"
                                   f"{self.log_text()[-8000:]}")
            try:
                self.get_json("/object_info/CheckpointLoaderSimple", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /object_info within {timeout:.0f}s:\n{self.log_text()[-8000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    # ---- HTTP --------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get_json(self, path: str, timeout: float = 60):
        return self.request("GET", path, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class is None:
            return self.get_json("/object_info", timeout=120)
        return self.get_json("/object_info/" + urllib.parse.quote(node_class))[node_class]

    def queue_prompt(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id or raises PromptRejected with the node errors."""
        try:
            answer = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = {"error": {"message": body.decode(errors="replace")}}
            raise PromptRejected(parsed) from None
        if answer.get("node_errors"):
            raise PromptRejected(answer)
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll /history/<id> until the prompt has finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry:  # the queue writes history only when the prompt is done
                return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_text()[-8000:]}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        self.request("POST", "/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} still running after {timeout:.0f}s:\n{self.log_text()[-6000:]}")

    def run(self, prompt: dict, timeout: float = 600) -> PromptResult:
        """Queue a prompt, wait for it, and return status, outputs, messages and its slice of the log."""
        offset = self.log_size()
        prompt_id = self.queue_prompt(prompt)
        entry = self.wait(prompt_id, timeout)
        time.sleep(0.05)  # let the log writer catch up with the end of execution
        status = entry.get("status") or {}
        return PromptResult(prompt_id=prompt_id, status=status.get("status_str", "unknown"),
                            outputs=entry.get("outputs", {}), messages=status.get("messages", []),
                            log=self.log_since(offset))

    def run_ok(self, prompt: dict, timeout: float = 600) -> PromptResult:
        """run(), failing the test with the node error and log unless the prompt succeeded."""
        result = self.run(prompt, timeout)
        if result.status != "success":
            raise AssertionError(result.describe())
        return result
