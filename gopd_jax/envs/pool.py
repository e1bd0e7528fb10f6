"""A pool of environment worker processes: one env instance per worker, one episode slot per worker.

Requests to different workers run in parallel: `step_async`/`reset_async` send, `collect` gathers.
A worker that crashes, hangs past its timeout or raises is killed and replaced by a fresh one;
its slot gets a terminal `env_failed` StepResult, so an episode is never silently dropped.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from gopd_jax.envs.base import StepResult, TaskSpec, env_splits, failed_step_result, make_env

# 'spawn', not 'fork': the parent may hold JAX/XLA threads, which fork does not survive.
_CTX = mp.get_context("spawn")
_STARTUP_ALLOWANCE_S = 120.0  # extra time for a fresh worker's imports and env construction
_WAIT_MODES = ("all", "any", "none")
# Set only while the parent starts a worker: the file where that worker reports an error raised before
# `_worker_main` runs (spawn first re-runs the parent's main script in the worker, which can fail).
_STARTUP_REPORT = "GOPD_JAX_WORKER_STARTUP_REPORT"
_NO_MAIN_GUARD = "finished its bootstrapping phase"  # multiprocessing's error when a worker re-runs the start
_STARTUP_ERROR = "its error while starting"
_SLOW_START = ("a starting worker first re-runs the parent's main script, so a script without an "
               "`if __name__ == \"__main__\":` guard repeats its own work (training, evaluation) in every worker "
               "before it can serve; put that work under such a guard")


def _report_startup_errors() -> None:
    """In a starting worker, also write an uncaught exception's traceback to the parent's report file."""
    path, previous = os.environ.get(_STARTUP_REPORT), sys.excepthook
    if not path:
        return

    def hook(kind, value, tb):
        try:
            with open(path, "w") as f:
                f.write("".join(traceback.format_exception(kind, value, tb)))
        except OSError:
            pass
        previous(kind, value, tb)

    sys.excepthook = hook


_report_startup_errors()  # runs when a starting worker imports this module, i.e. during its bootstrap


def _worker_main(conn, env_name: str, env_kwargs: dict) -> None:
    os.environ.pop(_STARTUP_REPORT, None)  # started: errors from here on go through the pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    env, start_error = None, None
    try:
        env = make_env(env_name, **env_kwargs)
    except Exception:
        start_error = traceback.format_exc()
    try:
        while True:
            try:
                method, args = conn.recv()
            except EOFError:
                return
            if method == "close":
                return
            if start_error is not None:
                conn.send(("error", start_error))
                continue
            try:
                conn.send(("ok", None if method == "ping" else getattr(env, method)(*args)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        if env is not None:
            env.close()


class _Worker:
    def __init__(self, env_name: str, env_kwargs: dict):
        self.conn, child_conn = _CTX.Pipe()
        self.process = _CTX.Process(target=_worker_main, args=(child_conn, env_name, env_kwargs), daemon=True)
        fd, self.report = tempfile.mkstemp(prefix="gopd_jax_worker_", suffix=".txt")
        os.close(fd)
        os.environ[_STARTUP_REPORT] = self.report  # inherited by the spawned interpreter only
        try:
            self.process.start()
        except BaseException:
            Path(self.report).unlink(missing_ok=True)
            raise
        finally:
            os.environ.pop(_STARTUP_REPORT, None)
        child_conn.close()
        self.fresh = True  # its first request also pays for start-up
        self.pending: tuple[str, float, bool] | None = None  # (method, deadline, sent to a starting worker)

    def kill(self) -> None:
        self.process.kill()  # SIGKILL also ends a SIGSTOPped process
        self.process.join(10)
        self.conn.close()
        Path(self.report).unlink(missing_ok=True)

    def death_reason(self) -> str:
        """Why the process died without answering, with its own error text when it died while starting."""
        self.process.join(1)
        reason = f"worker process died (exit code {self.process.exitcode})"
        report = Path(self.report).read_text().strip() if Path(self.report).is_file() else ""
        if _NO_MAIN_GUARD in report:
            reason += (": the script that started it has no `if __name__ == \"__main__\":` guard; workers are "
                       "spawned and re-run that script, so put its top-level work (run_experiment, EnvPool, ...) "
                       "under such a guard")
        return reason + (f"; {_STARTUP_ERROR}:\n{report}" if report else "")


class EnvPool:
    def __init__(self, env_name: str, env_kwargs: dict | None = None, num_workers: int = 1,
                 step_timeout_s: float = 60.0, reset_timeout_s: float = 120.0):
        env_splits(env_name)  # fail fast, in the parent, on an unknown name
        self.env_name, self.env_kwargs = env_name, dict(env_kwargs or {})
        self.timeouts = {"reset": reset_timeout_s, "step": step_timeout_s,
                         "expert_actions": step_timeout_s, "ping": 0.0}
        self.restarts = 0
        self._workers = [_Worker(env_name, self.env_kwargs) for _ in range(num_workers)]
        failed = self._run({s: ("ping", ()) for s in self.slots})
        # A failed worker was already replaced; ping the replacements once before giving up (unless it
        # failed in its own start-up code, which a retry repeats).
        if not any(_STARTUP_ERROR in str(value) for _, value in failed.values()):
            failed = self._run({s: ("ping", ()) for s, (status, _) in failed.items() if status != "ok"})
        for slot, (status, value) in failed.items():
            if status != "ok":
                self.close()
                raise RuntimeError(f"{env_name} worker {slot} failed to start:\n{value}")

    @property
    def slots(self) -> range:
        return range(len(self._workers))

    @property
    def num_pending(self) -> int:
        return sum(w.pending is not None for w in self._workers)

    # --- public API -------------------------------------------------------------------------

    def reset(self, assignments: dict[int, TaskSpec]) -> dict[int, tuple[str, StepResult]]:
        """Starts each slot's task; returns slot -> (goal, first StepResult). Other pending slots stay pending."""
        self.reset_async(assignments)
        return self._collect("all", only=set(assignments))

    def step(self, actions: dict[int, str]) -> dict[int, StepResult]:
        """Steps the given slots in parallel; returns their results. Other pending slots stay pending."""
        self.step_async(actions)
        return self._collect("all", only=set(actions))

    def reset_async(self, assignments: dict[int, TaskSpec]) -> None:
        for slot, task in assignments.items():
            self._submit(slot, "reset", (task,))

    def step_async(self, actions: dict[int, str]) -> None:
        for slot, action in actions.items():
            self._submit(slot, "step", (action,))

    def collect(self, wait_for: str = "all") -> dict[int, Any]:
        """Results of pending requests, by slot: wait for "all" of them, for "any" (at least one), or
        "none" (only those already finished). Reset results are (goal, StepResult), step results StepResult."""
        if wait_for not in _WAIT_MODES:
            raise ValueError(f"wait_for must be one of {_WAIT_MODES}, not {wait_for!r}")
        return self._collect(wait_for)

    def expert_actions(self, slot: int) -> list[str]:
        status, value = self._run({slot: ("expert_actions", ())})[slot]
        if status != "ok":
            raise RuntimeError(f"expert_actions failed on slot {slot}: {value}")
        return value

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(("close", ()))
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(5)
            worker.kill()
        self._workers = []

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------

    def _submit(self, slot: int, method: str, args: tuple) -> None:
        worker = self._workers[slot]
        if worker.pending is not None:
            raise ValueError(f"slot {slot} already has a pending {worker.pending[0]!r} request")
        allowance = _STARTUP_ALLOWANCE_S if worker.fresh else 0.0
        worker.pending = (method, time.monotonic() + self.timeouts[method] + allowance, worker.fresh)
        worker.fresh = False
        try:
            worker.conn.send((method, args))
        except OSError:  # the worker already died; `_gather` notices through its sentinel
            pass

    def _collect(self, wait_for: str, only: set[int] | None = None) -> dict[int, Any]:
        gathered = self._gather(wait_for, only)
        return {slot: self._as_result(*gathered[slot]) for slot in sorted(gathered)}

    def _run(self, requests: dict[int, tuple[str, tuple]]) -> dict[int, tuple[str, Any]]:
        for slot, (method, args) in requests.items():
            self._submit(slot, method, args)
        gathered = self._gather("all", only=set(requests))
        return {slot: (status, value) for slot, (_, status, value) in gathered.items()}

    def _gather(self, wait_for: str, only: set[int] | None = None) -> dict[int, tuple[str, str, Any]]:
        """slot -> (method, "ok" | "failed", value or failure reason), for pending slots in `only`."""
        done: dict[int, tuple[str, str, Any]] = {}
        while True:
            pending = {s: w for s, w in enumerate(self._workers)
                       if w.pending is not None and (only is None or s in only)}
            if not pending:
                return done
            next_deadline = min(w.pending[1] for w in pending.values())
            timeout = 0.0 if wait_for == "none" else max(0.0, next_deadline - time.monotonic())
            waitables = [w.conn for w in pending.values()] + [w.process.sentinel for w in pending.values()]
            ready = set(wait(waitables, timeout))
            for slot, worker in pending.items():
                method = worker.pending[0]
                if worker.conn in ready or worker.process.sentinel in ready:
                    try:
                        status, value = worker.conn.recv() if worker.conn.poll() else ("error", None)
                    except (EOFError, OSError):
                        status, value = "error", None
                    if status == "ok":
                        worker.pending = None
                        done[slot] = (method, "ok", value)
                        continue
                    reason = value or worker.death_reason()
                elif time.monotonic() >= worker.pending[1]:
                    reason = f"timed out after {self.timeouts[method]:.0f} s"
                    if worker.pending[2]:
                        reason = (f"no answer within {self.timeouts[method] + _STARTUP_ALLOWANCE_S:.0f} s of its "
                                  f"start; {_SLOW_START}")
                else:
                    continue
                self._restart(slot)
                done[slot] = (method, "failed", reason)
            if wait_for == "none" or (wait_for == "any" and done):
                return done

    def _restart(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self.env_name, self.env_kwargs)
        self.restarts += 1

    @staticmethod
    def _as_result(method: str, status: str, value: Any) -> Any:
        if status == "ok":
            return value
        failed = failed_step_result(f"{method}: {value}")
        return ("", failed) if method == "reset" else failed
