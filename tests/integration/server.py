"""A real ComfyUI server for the integration tests and bench/comfyui (no pytest needed).

Environment:
    COMFYUI_DIR            a ComfyUI checkout (required; without it every test here skips)
    COMFYUI_PYTHON         interpreter for the server (default: $COMFYUI_DIR/venv/bin/python if
                           present, else this interpreter)
    COMFYUI_IT_CACHE       where the tiny checkpoint (and make_flux.py's tiny Flux model and VAE)
                           are cached (default: ~/.cache/comfyui-lora-trainer-it)
    COMFYUI_START_TIMEOUT  seconds to wait for the server (default: 180)
    LORA_TRAINER_FIGURES   a JSON file: trainings run through `run_measured` add their step time and
                           the server's extra peak memory to it (bench/families.py sets it)

conftest.py's session-scoped `comfy` fixture builds a throw-away ComfyUI base folder (models/checkpoints
with a tiny SD1.5-shaped checkpoint from make_checkpoint.py, models/loras, input, output, user,
temp, custom_nodes with this pack symlinked in), starts `main.py --cpu` on a free loopback port
with `--base-directory` and friends pointing there, and yields a `ComfyClient`. HTTP is stdlib only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple


HERE = Path(__file__).resolve().parent
PACK_ROOT = HERE.parents[1]  # the repository root is the package ComfyUI imports


def importable_pack(root: Path) -> Path:
    """A new folder `root/path` whose `comfyui_lora_trainer` is this checkout: put it on PYTHONPATH to run
    `python -m comfyui_lora_trainer …` with ComfyUI's Python."""
    importable = root / "path"
    importable.mkdir()
    (importable / "comfyui_lora_trainer").symlink_to(PACK_ROOT)
    return importable
PACK_FOLDER_NAME = "comfyui-lora-trainer"  # the folder name users clone into custom_nodes/
CHECKPOINT_NAME = "tiny_sd15.safetensors"
HOST = "127.0.0.1"


class PromptError(Exception):
    """POST /prompt was refused (HTTP 400): `body` is ComfyUI's JSON (`error`, `node_errors`)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"POST /prompt -> HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


class ComfyClient:
    """A running ComfyUI server: HTTP helpers plus the folders and log of the test session.

    Tests reach the helpers through the fixture (conftest modules are not importable under
    --import-mode=importlib): `comfy.PromptError`, `comfy.execution_error(entry)`.
    """

    PromptError = PromptError

    def __init__(self, url: str, base_dir: Path, log_path: Path, process: subprocess.Popen) -> None:
        self.url = url
        self.base_dir = base_dir
        self.input_dir = base_dir / "input"
        self.output_dir = base_dir / "output"
        self.loras_dir = base_dir / "models" / "loras"
        self.checkpoint = CHECKPOINT_NAME  # the ckpt_name CheckpointLoaderSimple takes
        self.log_path = log_path
        self.process = process

    # -- raw HTTP -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        """Send JSON (if `body`), return (HTTP status, decoded JSON or text). No raise on 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, text

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} -> HTTP {status}: {body!r:.500}"
        return body

    # -- the API the tests use ------------------------------------------------------------
    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/<class> (that node's entry, or {})."""
        if node_class is None:
            return self.get("/object_info")
        return self.get(f"/object_info/{node_class}").get(node_class, {})

    def post_prompt(self, prompt: dict, client_id: str = "integration-tests") -> tuple[int, Any]:
        """POST /prompt with an API-format graph; returns (status, body) without raising."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id})

    def queue(self, prompt: dict) -> str:
        """Queue an API-format graph and return its prompt_id; raises PromptError on HTTP 400."""
        status, body = self.post_prompt(prompt)
        if status != 200:
            raise PromptError(status, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history/<id> until the prompt finished (success or error); return its entry.

        The entry has `outputs` ({node_id: {"images": [...], ...}}) and `status`
        (`status_str` "success"/"error", `messages` [[event, data], ...]).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.process.returncode}):\n{self.log()[-5000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s; log tail:\n{self.log()[-5000:]}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue, wait, and assert success; return the history entry."""
        entry = self.wait(self.queue(prompt), timeout)
        assert entry["status"]["status_str"] == "success", execution_error(entry) or entry["status"]
        return entry

    def interrupt(self) -> None:
        """POST /interrupt: cancel the prompt that is running now."""
        self.request("POST", "/interrupt", {})

    def free(self) -> None:
        """POST /free: unload models and drop cached node outputs."""
        self.request("POST", "/free", {"unload_models": True, "free_memory": True})

    def log(self, since: int = 0) -> str:
        """Server stdout+stderr so far (from character `since`; use len(log()) as a mark)."""
        return self.log_path.read_text("utf-8", "replace")[since:]

    def output_files(self, pattern: str = "**/*") -> list[Path]:
        return sorted(p for p in self.output_dir.glob(pattern) if p.is_file())

    @staticmethod
    def execution_error(entry: dict) -> str | None:
        return execution_error(entry)


class Measured(NamedTuple):
    entry: dict  # the history entry
    log: str  # the server's log meanwhile
    seconds_per_step: float | None  # Train LoRA's log: seconds per step after the first; None if it has none
    extra_peak_mib: float | None  # the server's peak RSS over its RSS before; None where Linux can't reset it


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _seconds_per_step(log: str) -> float | None:
    """Train LoRA's own figure: its log's seconds per step after the first step."""
    found = re.findall(r"Train LoRA: ([\d.]+) s/step over \d+ steps after the first", log)
    return float(found[-1]) if found else None


def run_measured(client: "ComfyClient", graph: dict, steps: int, figure: str | None = None,
                 timeout: float = 600, **settings: Any) -> Measured:
    """Run a training graph of `steps` steps and measure it: the server's extra peak RSS (its
    high-water mark reset to its RSS just before) and the seconds per step Train LoRA logged. With `figure`
    and LORA_TRAINER_FIGURES set, the figures (and `settings`, which say what was trained) are
    added to that file under `figure`."""
    pid = client.process.pid
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
        before = _proc_kib(pid, "VmRSS")
    except OSError:
        before = None
    mark = len(client.log())
    entry = client.run(graph, timeout=timeout)
    extra = None if before is None else (_proc_kib(pid, "VmHWM") - before) / 1024
    log = client.log(mark)
    measured = Measured(entry, log, _seconds_per_step(log), extra)
    out = os.environ.get("LORA_TRAINER_FIGURES")
    if figure and out:
        path = Path(out)
        figures = json.loads(path.read_text()) if path.exists() else {}
        figures[figure] = {"steps": steps, "seconds_per_step": measured.seconds_per_step,
                           "extra_peak_rss_mib": extra, **settings}
        path.write_text(json.dumps(figures, indent=2))
    return measured


def expected_lora_keys(model_keys: list[str], lora: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """The keys a `full`-format LoRA of this model file must hold: per weight its lora_up/lora_down pair
    (where the LoRA has one) or a `.diff`, per bias a `.diff_b`; keys in `skip` have no adapter."""
    expected = []
    for key in model_keys:
        if key in skip:
            continue
        module, kind = key.rsplit(".", 1)
        prefix = "lora_unet_" + module.replace(".", "_")
        if kind == "bias":
            expected.append(prefix + ".diff_b")
        elif prefix + ".lora_up.weight" in lora:
            expected += [prefix + ".lora_up.weight", prefix + ".lora_down.weight"]
        else:
            expected.append(prefix + ".diff")
    return expected


def execution_error(entry: dict) -> str | None:
    """The `execution_error` message of a history entry ("NodeType: ExceptionType: text"), or None."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
    return None


# ---- fixture plumbing --------------------------------------------------------------------
class NoComfyUI(Exception):
    """COMFYUI_DIR is unset or is not a ComfyUI checkout (tests skip, benchmarks stop)."""


def comfyui_dir() -> Path:
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        raise NoComfyUI("integration tests need a ComfyUI checkout: set COMFYUI_DIR")
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise NoComfyUI(f"COMFYUI_DIR={value} has no main.py")
    return path


def comfyui_or_skip() -> tuple[Path, str]:
    """(ComfyUI checkout, its Python) for a test; the test is skipped when COMFYUI_DIR names none.
    Benchmarks call comfyui_dir and stop on NoComfyUI instead."""
    import pytest  # only the tests get here; the benchmarks import this module without pytest

    try:
        comfy_dir = comfyui_dir()
    except NoComfyUI as why:
        pytest.skip(str(why))
    return comfy_dir, comfyui_python(comfy_dir)


def comfyui_python(comfy_dir: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv_python = comfy_dir / "venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def cached_checkpoint(comfy_dir: Path, python: str) -> Path:
    """Build the tiny checkpoint once per version of make_checkpoint.py and reuse it."""
    script = HERE / "make_checkpoint.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:10]
    cache = Path(os.environ.get("COMFYUI_IT_CACHE", "~/.cache/comfyui-lora-trainer-it")).expanduser()
    path = cache / f"tiny_sd15-{digest}.safetensors"
    if not path.exists():
        env = dict(os.environ, COMFYUI_DIR=str(comfy_dir))
        done = subprocess.run([python, str(script), str(path)], cwd=comfy_dir, env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"make_checkpoint.py failed:\n{done.stdout}\n{done.stderr}")
    return path


FLUX_MODEL_NAME = "tiny_flux.safetensors"  # make_flux.py's files: UNETLoader's unet_name
FLUX_VAE_NAME = "tiny_flux_vae.safetensors"  # and VAELoader's vae_name


def cached_flux(comfy_dir: Path, python: str) -> tuple[Path, Path]:
    """Build the tiny Flux model and its VAE once per version of make_flux.py; (model, vae)."""
    script = HERE / "make_flux.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:10]
    cache = Path(os.environ.get("COMFYUI_IT_CACHE", "~/.cache/comfyui-lora-trainer-it")).expanduser()
    folder = cache / f"tiny_flux-{digest}"
    model, vae = folder / FLUX_MODEL_NAME, folder / FLUX_VAE_NAME
    if not (model.exists() and vae.exists()):
        env = dict(os.environ, COMFYUI_DIR=str(comfy_dir))
        done = subprocess.run([python, str(script), str(folder)], cwd=comfy_dir, env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"make_flux.py failed:\n{done.stdout}\n{done.stderr}")
    return model, vae


def _link(target: Path, link: Path) -> None:
    try:
        link.symlink_to(target, target_is_directory=target.is_dir())
    except OSError:  # no symlinks on this filesystem
        (shutil.copytree if target.is_dir() else shutil.copy2)(target, link)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_base_dir(root: Path, checkpoint: Path | None, extra: dict[str, Path] | None = None) -> None:
    """The folders of a ComfyUI base dir, the checkpoint (if any) and this pack linked in, plus
    `extra` files linked in at their paths relative to `root` (e.g. models/vae/x.safetensors)."""
    for sub in ("models/checkpoints", "models/loras", "input", "output", "user", "temp", "custom_nodes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        _link(checkpoint, root / "models" / "checkpoints" / CHECKPOINT_NAME)
    _link(PACK_ROOT, root / "custom_nodes" / PACK_FOLDER_NAME)
    for relative, target in (extra or {}).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        _link(target, root / relative)


def _wait_until_up(client: ComfyClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.process.poll() is not None:
            break
        try:
            if client.request("GET", "/object_info", timeout=10)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    exited = client.process.poll() is not None
    stop(client.process)
    why = f"exited with code {client.process.returncode}" if exited else f"no answer within {timeout} s"
    raise RuntimeError(f"ComfyUI did not start ({why}); server log:\n{client.log()[-20000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def start_server(comfy_dir: Path, python: str, base: Path, timeout: float | None = None) -> ComfyClient:
    """Start `main.py --cpu` on a free loopback port with its folders under `base` (made by
    make_base_dir); return the client once /object_info answers."""
    port = _free_port()
    cmd = [python, "main.py", "--cpu", "--listen", HOST, "--port", str(port),
           "--base-directory", str(base),
           "--input-directory", str(base / "input"), "--output-directory", str(base / "output"),
           "--user-directory", str(base / "user"), "--temp-directory", str(base / "temp"),
           "--database-url", "sqlite:///:memory:",  # keep the checkout's user/comfyui.db untouched
           "--disable-auto-launch", "--disable-api-nodes"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path = base / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, cwd=comfy_dir, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = ComfyClient(f"http://{HOST}:{port}", base, log_path, process)
    _wait_until_up(client, timeout or float(os.environ.get("COMFYUI_START_TIMEOUT", "180")))
    return client
