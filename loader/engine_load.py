"""An engine worker's model load with engine shard sets: replay a capture, or load and capture.

Where vLLM's own ``load_model`` builds the model, fills it and post-processes it, this does::

    build the model
    lease the rank, read its manifest, and work out the capture key (when a capture helps:
        the engine's weight loaders would slice full tensors, or the model is quantised)
    a capture for exactly this key?
      yes: stream its tensors straight into the model (each chunk checked before any of it
           lands), then post-process what it does not already contain (nothing, for a
           ``processed`` capture)
      no, or it does not fit, or its bytes fail: load the model the normal way (rank shard,
           or full tensors through the weight loaders), which rewrites every weight
    post-process; after a normal load, upload what the rank ended with, in the background,
        once the engine is ready (the ``ready_file`` the launcher creates), so the first start
        is not slower

A capture holds the **processed** tensors when vLLM can take them back (every quantisation
method of the model declares ``supports_pre_processed_weights``, vLLM's own contract for
weights already in runtime format) and its post-processing left every weight in a tensor;
otherwise the **loaded** ones, as the weight loaders left them (on the CPU vLLM packs linear
weights into oneDNN handles that are not tensors; GPTQ/AWQ repacks cannot be taken back). A
key that does not match, a capture that does not fit or whose bytes fail verification, never
mixes into a load: it is said on stderr, in the log and in the load report (``capture``), and
the rank loads the normal way. The engine-specific parts come in as :class:`Engine`, so all of
this runs with toy modules and no vLLM in the tests.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import torch

from api.schema import CaptureKey, CaptureUse, Manifest
from clients.errors import ClientError, RateLimitedError
from loader.captures import (
    CaptureClient,
    CaptureMismatch,
    CapturePayload,
    capture_tensors,
    device_kind,
    explain_miss,
    plan_replay,
    replay_capture,
)
from loader.devices import model_device, synchronize
from loader.vllm_plugin import (
    fill_from_manifest,
    finish_report,
    open_rank_session,
    rank_failures,
    select_model,
)

__all__ = ["Engine", "EngineFacts", "capture_key", "load_engine_model"]

log = logging.getLogger("weightcache.loader")
#: How often a capture waiting for the engine to be ready looks for the ready file.
_READY_POLL_S = 0.25


@dataclass(frozen=True)
class EngineFacts:
    """What a capture key says about the engine a rank runs in."""

    engine: str
    engine_version: str
    tp_size: int
    rank: int
    pp_size: int
    pp_rank: int
    dtype: str
    quantization: str | None
    #: :func:`loader.captures.weights_settings` of the engine's resolved model config and
    #: the settings that change the parameters it ends with.
    settings: str


class Engine(Protocol):
    """What :func:`load_engine_model` needs of the engine (vLLM in ``loader.vllm_plugin``)."""

    facts: EngineFacts

    def create_model(self) -> torch.nn.Module:
        """A new model of the engine's layout, its parameters allocated on the target."""

    def post_process(self, model: torch.nn.Module, *, already_processed: bool) -> None:
        """The engine's post-processing; ``already_processed``: the weights are in runtime
        format already (only what is not a tensor is rebuilt)."""

    def processed_blocker(self, model: torch.nn.Module) -> str | None:
        """Why post-processed weights could not be taken back by this model; None if they can."""


def _say(message: str, *, level: int = logging.INFO) -> None:
    line = f"weightcache: {message}"
    print(line, file=sys.stderr, flush=True)
    log.log(level, line)


def capture_key(
    options: dict[str, Any], facts: EngineFacts, manifest: Manifest, model: str,
    device: torch.device,
) -> tuple[CaptureKey | None, str]:
    """The key of this rank's capture, or None and why no capture is wanted."""
    if options.get("capture", True) is False:
        return None, 'captures are off ("capture": false)'
    if facts.quantization is None and manifest.mode == "sharded":
        return None, "not needed: the rank shard is in the engine's layout already"
    if facts.quantization is None and facts.tp_size == 1:
        return None, "not needed: at TP 1 an unquantised checkpoint is the rank's weights"
    snapshot = manifest.snapshots.get(model)
    if snapshot is None:
        return None, "the node does not say the model's snapshot (a node older than captures)"
    key = CaptureKey(
        kind="weights",
        model=model,
        engine=facts.engine,
        engine_version=options.get("engine_version") or facts.engine_version,
        tp_size=facts.tp_size,
        rank=facts.rank,
        pp_size=facts.pp_size,
        pp_rank=facts.pp_rank,
        dtype=facts.dtype,
        quantization=facts.quantization or "none",
        device=device_kind(device),
        snapshot=snapshot,
        settings=facts.settings,
    )
    return key, ""


def load_engine_model(engine: Engine, options: dict[str, Any]) -> torch.nn.Module:
    """Build, fill and post-process the rank's model (see the module docstring)."""
    facts = engine.facts
    with rank_failures(facts.rank, facts.tp_size):
        return _load(engine, options)


def _load(engine: Engine, options: dict[str, Any]) -> torch.nn.Module:
    facts = engine.facts
    model = engine.create_model()
    device = model_device(model)
    started = time.perf_counter()
    with open_rank_session(options, tp_size=facts.tp_size, rank=facts.rank,
                           device=device) as session:
        manifest = session.manifest
        chosen = select_model(manifest, options.get("model"))
        name = manifest.tensors[chosen[0]].model
        key, why_not = capture_key(options, facts, manifest, name, device)
        use = CaptureUse(used=False, reason=why_not)
        if key is not None:
            use, touched = _replay(model, session, key, options["pipeline"], name, device)
            if touched and not use.used:
                _after_partial_replay(use)
            if not use.used:
                _say(f"rank {facts.rank}/{facts.tp_size} capture not used, loading the normal "
                     f"way: {use.reason}", level=logging.WARNING if touched else logging.INFO)
        if use.used:
            mode = f"capture ({use.stage}) straight into the parameters"
        else:
            mode = fill_from_manifest(model, session, options,
                                      quantized=facts.quantization is not None)
        synchronize(device)
    finish_report(session, options, mode=mode, started=started,
                  capture=use.model_dump(mode="json"))
    if use.used:
        engine.post_process(model, already_processed=use.stage == "processed")
        return model
    uploads = key is not None and options.get("capture", True) is True
    keeper = _Keeper.before(model, engine, device) if uploads else None
    engine.post_process(model, already_processed=False)
    if keeper is not None and key is not None:
        payload, note = keeper.after(model)
        if payload is None:
            _say(f"rank {facts.rank}/{facts.tp_size} no capture: {note}")
        else:
            _upload_when_ready(payload, key, options, session.url, session.token, note=note)
    return model


def _replay(
    model: torch.nn.Module, session: Any, key: CaptureKey, pipeline: str, name: str,
    device: torch.device,
) -> tuple[CaptureUse, bool]:
    """Replay the capture of ``key`` into ``model``: (what happened, whether any byte of the
    model was changed)."""
    touched = False
    capture = None
    with CaptureClient(session.url, pipeline, token=session.token) as client:
        try:
            capture = client.find(key)
            if capture is None:
                return CaptureUse(used=False, reason=explain_miss(key, client.list())), False
            destinations = plan_replay(capture, model)
            touched = True
            session.report.stream = replay_capture(
                capture, destinations, source=session.source, device=device,
                pipeline=pipeline, model=name,
            )
        except CaptureMismatch as exc:
            return CaptureUse(used=False, id=_id(capture), stage=_stage(capture),
                              reason=f"the capture does not fit the model: {exc}"), False
        except (ClientError, httpx.HTTPError, OSError, ValueError) as exc:
            code = getattr(exc, "code", None) or type(exc).__name__
            what = "its bytes failed" if touched else "it could not be read"
            return CaptureUse(used=False, id=_id(capture), stage=_stage(capture),
                              reason=f"capture {_id(capture)}: {what}: {code}: {exc}"), touched
    return CaptureUse(used=True, id=capture.id, stage=capture.stage,
                      reason=f"replayed the {capture.stage} capture {capture.id}"), True


def _after_partial_replay(use: CaptureUse) -> None:
    """Whether a replay that failed part-way may be followed by the normal load.

    Only verified chunks reach the tensors (the stream checks each chunk before it delivers
    any of it), and those hold this very key's tensors as the weight loaders left them: the
    normal load rewrites every weight of the checkpoint, and what it does not rewrite already
    holds what it would. A ``processed`` capture is another format, which must not stay beside
    freshly loaded weights: that start stops here instead (the node has put aside a capture
    that failed its digests, so the next start loads the normal way).
    """
    if use.stage == "processed":
        raise CaptureMismatch(
            f"{use.reason}; a post-processed capture cannot be undone in place, so this start "
            "stops rather than mix it with a normal load"
        )


def _id(capture: Any) -> str | None:
    return None if capture is None else str(capture.id)


def _stage(capture: Any) -> Any:
    return None if capture is None else capture.stage


class _Keeper:
    """What a capture will hold, kept across post-processing: the loaded tensors when the
    processed ones may turn out not to be capturable (references on the CPU, where they cost
    nothing unless post-processing replaces them; a host copy on an accelerator, so that no
    device memory is held while the engine sizes its KV cache)."""

    def __init__(
        self, kept: dict[str, torch.Tensor] | None, buffers: set[str], names: set[str],
        blocker: str | None,
    ) -> None:
        self.kept = kept
        self.buffers = buffers
        self.names = names
        self.blocker = blocker

    @classmethod
    def before(cls, model: torch.nn.Module, engine: Engine, device: torch.device) -> _Keeper:
        blocker = engine.processed_blocker(model)
        tensors, buffers = capture_tensors(model)
        kept: dict[str, torch.Tensor] | None = None
        if any(t.is_meta for t in tensors.values()):
            # weights that materialise only in post-processing (online quantisation)
            return cls(None, buffers, set(tensors), "parameters on the meta device")
        if device.type == "cpu":
            # parameters by reference; buffers (scales and the like, small) copied, since
            # post-processing may update them in place
            kept = {n: t.clone() if n in buffers else t for n, t in tensors.items()}
        elif blocker is not None:
            kept = {n: t.to("cpu", copy=True) for n, t in tensors.items()}
        return cls(kept, buffers, set(tensors), blocker)

    def after(self, model: torch.nn.Module) -> tuple[CapturePayload | None, str]:
        """The payload to upload and why it is of its stage; (None, why) when there is none."""
        final, buffers = capture_tensors(model)
        gone = sorted(self.names - final.keys())
        if self.blocker is None and not gone:
            self.kept = None
            return (CapturePayload.build(final, stage="processed", buffers=buffers),
                    "the post-processed tensors")
        reason = self.blocker or (
            f"post-processing took {len(gone)} weight(s) out of tensors "
            f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''})"
        )
        if self.kept is None:
            return None, f"the post-processed weights cannot be captured: {reason}"
        payload = CapturePayload.build(self.kept, stage="loaded", buffers=self.buffers)
        self.kept = None
        return payload, f"the loaded tensors: {reason}"


#: How long a capture upload keeps asking while the node says the tenant's uploads are busy.
_UPLOAD_TURN_WAIT_S = 600.0


def _upload_waiting_turns(
    client: CaptureClient, key: CaptureKey, payload: CapturePayload, *, who: str
) -> Any:
    """Upload, waiting for a turn while the node answers 429 (the tenant's other ranks and
    replicas are uploading: each tenant has a few upload slots)."""
    deadline = time.monotonic() + _UPLOAD_TURN_WAIT_S
    while True:
        try:
            return client.upload_payload(key, payload)
        except RateLimitedError as busy:
            wait = busy.retry_after or 5.0
            if time.monotonic() + wait > deadline:
                raise
            _say(f"{who} capture upload waits {wait:g} s for a turn: {busy}")
            time.sleep(wait)


def _upload_when_ready(
    payload: CapturePayload, key: CaptureKey, options: dict[str, Any], url: str,
    token: str | None, *, note: str,
) -> threading.Thread:
    """Upload ``payload`` in a daemon thread once ``options["ready_file"]`` exists (at once
    without one). A failure is said, never raised: the engine serves either way."""
    ready = Path(options["ready_file"]) if options.get("ready_file") else None
    who = f"rank {key.rank}/{key.tp_size}"

    def run() -> None:
        try:
            while ready is not None and not ready.exists():
                time.sleep(_READY_POLL_S)
            mark = time.perf_counter()
            with CaptureClient(url, options["pipeline"], token=token, timeout=600) as client:
                info = _upload_waiting_turns(client, key, payload, who=who)
            _say(f"{who} capture stored: {info.bytes / 1e6:.1f} MB, {note}, in "
                 f"{time.perf_counter() - mark:.2f} s (id {info.id[:12]})")
        except Exception as exc:  # the engine is serving: a capture is never worth failing it
            code = getattr(exc, "code", None) or type(exc).__name__
            _say(f"{who} capture not stored: {code}: {exc}", level=logging.WARNING)

    thread = threading.Thread(target=run, name=f"weightcache-capture-{key.rank}", daemon=True)
    thread.start()
    return thread
