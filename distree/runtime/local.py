"""Stage servers as local processes: what the loopback tests and benchmarks start, one per device."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from distree.lifetime import dies_with_this_process


class StageProcess:
    """``python -m distree serve`` in its own process; ``address`` is the one it printed it bound."""

    def __init__(self, bundle: Path, device: str, listen: str = "127.0.0.1:0", next_address: Optional[str] = None,
                 extra_args: Sequence[str] = (), prefix: Sequence[str] = (), start_timeout_s: float = 180,
                 cwd: Optional[Path] = None, python: Sequence[str] = (sys.executable,),
                 env: Optional[dict] = None) -> None:
        """``python``: the interpreter's command line (an emulated aarch64 one: ``aarch64_command([], root)``)."""
        cmd = [*prefix, *python, "-u", "-m", "distree", "serve", str(bundle), "--device", device,
               "--listen", listen, *extra_args] + (["--next", next_address] if next_address else [])
        self.device = device
        self.proc = subprocess.Popen(dies_with_this_process(cmd), cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.address = self._wait_for_address(start_timeout_s)

    def _wait_for_address(self, timeout_s: float) -> str:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("serving "):
                return line.split(" on ")[1].split(",")[0].strip()
        self.stop()
        raise RuntimeError(f"{self.device} server did not start: {self.proc.stderr.read()}")

    def stop(self) -> None:
        """Kill (works on a SIGSTOPped server too) and reap the process."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
