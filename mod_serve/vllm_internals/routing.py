"""Model-side routing state: per-request routed-token counts of every routed layer, in the worker.

Per step, ``begin`` lines the counts up with the batch (rows of the model runner's input batch)
and computes the step's host-side constants once for all routed layers; each routed layer decides
its tokens (``RoutingStep.route``) and adds its counts; ``end`` stores the new totals and queues
the report for the scheduler; after the step ``trim_block_tables`` shortens the worker's block
tables exactly as ``RoutedKVManager.settle`` shortens the scheduler's block lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from .kv import routed_groups


THRESHOLD_DECIMALS = 2
"""A request's own threshold is rounded to 0.01: at most 101 routing classes, so prefix-cache
entries (keyed by p) do not fragment, and the reported p is the one used."""


def request_threshold(extra_args: dict | None, default: float) -> float:
    """The routing threshold p of a request: ``extra_args["mod_threshold"]`` (SamplingParams; the
    server puts the request body's ``mod_threshold`` there) rounded to 0.01, else ``default``."""
    p = (extra_args or {}).get("mod_threshold")
    if p is None:
        return default
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"mod_threshold must be a number in [0, 1], got {p!r}")
    return round(float(p), THRESHOLD_DECIMALS)


_NO_TOKENS = torch.empty(0, dtype=torch.int64)


@dataclasses.dataclass
class RoutingStep:
    req_ids: list[str]
    num_tokens: int  # scheduled tokens (the forward may carry padding after them)
    max_query_len: int  # host-side: longest query of the step
    settled: np.ndarray  # [num_reqs] tokens of each request computed once this step ends
    token_req: torch.Tensor  # [num_tokens] batch row of each scheduled token (model device)
    token_req_host: np.ndarray  # the same on the host
    prior_host: np.ndarray  # [num_routed_layers, num_reqs] routed tokens before this step
    prior: torch.Tensor  # the same on the model device
    new: torch.Tensor  # [num_routed_layers, num_reqs] routed tokens in this step (model device)
    tp_group: object | None  # set when routing decisions must be shared across TP ranks
    p: float | torch.Tensor  # routing threshold: one for the step, or per token when requests differ
    has_sink: bool  # some token of this step sits at a forced sink position
    is_decode: bool  # one token per request: token i belongs to request i
    max_seq_len: list[int]  # per routed layer: a host-side upper bound of prior + new
    # Prefix caching: block boundaries crossed in this step, (batch rows, N, token index of
    # the boundary's last token), or None; then route() keeps each layer's routed indices.
    crossings: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    new_host: np.ndarray | None = None  # on the CPU: ``new``'s memory as an array
    routed_log: list = dataclasses.field(default_factory=list)
    metadata_memo: dict = dataclasses.field(default_factory=dict)  # compact attention metadata by content
    attn_names: dict = dataclasses.field(default_factory=dict)  # routed slot -> its Attention's layer name
    layer_steps: dict | None = None  # routed slot -> its constants this step (``attention.LayerStep``, CPU)
    _all_in_qsl: torch.Tensor | None = None
    _decode_host: tuple | None = None

    def cpu_token_req(self) -> torch.Tensor:
        """``token_req`` for the C++ routed attention: empty in a decode step (token i is request i's)."""
        return _NO_TOKENS if self.is_decode else self.token_req

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    def all_in_qsl(self) -> torch.Tensor:
        """query_start_loc of a decode step with every request's token routed in: 0..num_reqs."""
        if self._all_in_qsl is None:
            self._all_in_qsl = torch.arange(self.num_reqs + 1, dtype=torch.int32)
        return self._all_in_qsl

    def decode_host(self, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[torch.Tensor]]:
        """Host constants of a decode step, once for all routed layers: (batch rows, block column
        and in-block offset of each request's next compact token per routed layer, and per routed
        layer the compact sequence lengths if every request's token is routed in)."""
        if self._decode_host is None or self._decode_host[0] != block_size:
            prior = self.prior_host
            self._decode_host = (block_size, np.arange(self.num_reqs), prior // block_size, prior % block_size,
                                 list(torch.from_numpy((prior + 1).astype(np.int32)).unbind(0)))
        return self._decode_host[1:]

    def route(self, routed: torch.Tensor) -> torch.Tensor:
        """Indices of the tokens routed in, from a [num_tokens(+padding)] bool mask. Under tensor
        parallelism TP rank 0 decides and every rank uses its mask (the all-reduced hidden states
        are replicated, but a gate within rounding of p must not split the ranks)."""
        if self.tp_group is not None:
            mask = routed.to(torch.uint8)
            routed = self.tp_group.broadcast(mask, src=0).bool()
        if routed.shape[0] > self.num_tokens:  # padding rows never route
            routed = routed[: self.num_tokens]
        idx = routed.nonzero().squeeze(-1)
        if self.crossings is not None:  # routed layers run in layer order
            self.routed_log.append(idx)
        return idx


class RoutingState:
    def __init__(self, routed_layers: Sequence[int], threshold: float, sink_tokens: int = 0):
        self.routed_layers = list(routed_layers)
        self.sink_tokens = sink_tokens
        self.threshold = threshold  # the checkpoint's p (or the server's --mod-threshold)
        self.p_of: dict[str, float] = {}  # req -> its own threshold
        self.slot = {layer: j for j, layer in enumerate(self.routed_layers)}
        self.counts: dict[str, tuple[int, np.ndarray]] = {}  # req -> (settled tokens, routed per layer)
        self.runner = None
        self.cpu_ops = None  # on the CPU, the C++ routed ops' module (``cpu_decode``), told each step
        self.group_of_layer: dict[int, int] = {}
        self.pending_report: dict[str, tuple[int, dict[int, int]]] = {}
        self._trim: np.ndarray | None = None  # routed totals [layers, rows] of the step just run
        self._rows_of: tuple | None = None  # (input batch, its routed tables' blocks-per-row arrays)
        self.totals_routed = np.zeros(len(self.routed_layers), dtype=np.int64)
        self.totals_tokens = 0
        self.step: RoutingStep | None = None  # the step being run, None outside a real step
        self.attn_names: dict[int, str] = {}  # routed slot -> layer name of its Attention (set by the model)
        # Prefix caching (set by the worker when it is on): block size of the hash boundaries
        # at which routed counts are reported, and those reports ({req: [(N, {layer: r})]}).
        self.boundary_block_size: int | None = None
        self.pending_boundaries: dict[str, list[tuple[int, dict[int, int]]]] = {}
        self._layer_order = [self.slot[layer] for layer in sorted(self.routed_layers)]

    def bind_runner(self, runner) -> None:
        self.runner = runner
        if runner.device.type == "cpu":
            from . import cpu_decode

            self.cpu_ops = cpu_decode.extension()

    def bind_groups(self, kv_cache_config) -> None:
        groups = routed_groups(kv_cache_config)
        if set(groups) != set(self.routed_layers):
            raise RuntimeError(
                f"mod-serve: routed layers {self.routed_layers} but KV cache groups for {sorted(groups)}"
            )
        self.group_of_layer = groups

    def restore(self, restored: dict | None) -> None:
        """Requests resumed from a prefix-cache hit: ``{req: (N, {layer: r_i(N)})}``."""
        for req_id, (num_tokens, routed) in (restored or {}).items():
            self.counts[req_id] = (num_tokens, np.array([routed[layer] for layer in self.routed_layers], dtype=np.int64))

    def forget(self, req_ids) -> None:
        for r in req_ids:
            self.counts.pop(r, None)
            self.p_of.pop(r, None)

    # ---- per step -------------------------------------------------------------------------
    def begin(self, num_tokens: int, device: torch.device) -> RoutingStep | None:
        from vllm.distributed import get_tp_group
        from vllm.forward_context import get_forward_context, is_forward_context_available

        runner = self.runner
        if self.cpu_ops is not None:
            self.cpu_ops.clear_step()  # until this step is known to be real, the C++ ops defer to Python
        if runner is None or not is_forward_context_available():
            return None
        if not isinstance(get_forward_context().attn_metadata, dict):
            return None  # a dummy/profiling run: no requests behind these tokens
        num_reqs = runner.input_batch.num_reqs
        if num_reqs == 0:
            return None
        qsl = runner.query_start_loc.cpu[: num_reqs + 1].numpy()
        if int(qsl[-1]) > num_tokens:
            return None
        req_ids = runner.input_batch.req_ids[:num_reqs]
        computed = runner.input_batch.num_computed_tokens_cpu[:num_reqs]
        prior = np.zeros((len(self.routed_layers), num_reqs), dtype=np.int64)
        for row, req_id in enumerate(req_ids):
            done = int(computed[row])
            if done == 0:
                continue  # new, or resumed after preemption (recomputed from scratch)
            settled, routed = self.counts.get(req_id, (0, None))
            if settled != done or routed is None:
                raise RuntimeError(
                    f"mod-serve: routed-KV state of request {req_id} is out of sync "
                    f"({settled} tokens settled, vLLM says {done} computed)"
                )
            prior[:, row] = routed
        lengths = np.diff(qsl)
        tp = get_tp_group()
        prior_dev = torch.from_numpy(prior).to(device)
        token_req_host = np.repeat(np.arange(num_reqs), lengths)
        token_req = torch.from_numpy(token_req_host).to(device)
        # On the CPU, ``new`` shares memory with a numpy array the routed layers fill on the host.
        new = torch.from_numpy(np.zeros_like(prior)) if device.type == "cpu" else torch.zeros_like(prior_dev)
        p_req = [self._threshold(runner, r) for r in req_ids]
        p = p_req[0] if len(set(p_req)) == 1 else torch.tensor(p_req, dtype=torch.float32, device=device)[token_req]
        self.step = RoutingStep(
            req_ids=list(req_ids),
            num_tokens=int(qsl[-1]),
            max_query_len=int(lengths.max()),
            settled=computed.astype(np.int64) + lengths,
            token_req=token_req,
            token_req_host=token_req_host,
            prior_host=prior,
            prior=prior_dev,
            new=new,
            new_host=new.numpy() if device.type == "cpu" else None,
            tp_group=tp if tp.world_size > 1 else None,
            p=p,
            has_sink=bool((computed < self.sink_tokens).any()),
            is_decode=int(qsl[-1]) == num_reqs,
            max_seq_len=(prior.max(axis=1) + int(lengths.max())).tolist(),
            crossings=self._crossings(computed, lengths, qsl),
            attn_names=self.attn_names,
        )
        if self.cpu_ops is not None:
            self._tell_cpu_ops(self.step)
        return self.step

    def _tell_cpu_ops(self, step: RoutingStep) -> None:
        """What the C++ routed ops need to run this step without Python: they decide here when
        the step has one threshold and nothing to share across TP ranks (keeping the indices when
        the prefix cache's boundary log needs them), and attend here in every step."""
        from .attention import step_block_tables

        route_here = step.tp_group is None and not isinstance(step.p, torch.Tensor)
        self.cpu_ops.set_step(route_here, route_here and step.crossings is not None, step.p if route_here else 0.0,
                              step.num_tokens, True, step.cpu_token_req(), step.prior, step.new,
                              step_block_tables(step, len(self.routed_layers)))

    def _crossings(self, computed: np.ndarray, lengths: np.ndarray, qsl: np.ndarray):
        """Block boundaries N = jB with computed < N <= computed + length, per batch row."""
        B = self.boundary_block_size
        if B is None:
            return None
        start = computed.astype(np.int64)
        first, last = start // B + 1, (start + lengths) // B
        n = np.maximum(last - first + 1, 0)
        if not n.any():
            return None
        rows = np.repeat(np.arange(len(n)), n)
        offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        bounds = (first[rows] + offsets) * B
        return rows, bounds, qsl[rows].astype(np.int64) + bounds - start[rows] - 1

    def _threshold(self, runner, req_id: str) -> float:
        p = self.p_of.get(req_id)
        if p is None:
            state = runner.requests.get(req_id)
            params = state.sampling_params if state is not None else None
            p = self.p_of[req_id] = request_threshold(params.extra_args if params else None, self.threshold)
        return p

    def end(self) -> None:
        step, self.step = self.step, None
        if self.cpu_ops is not None:
            if step is not None and step.crossings is not None:
                cpp_log = self.cpu_ops.take_routed_log()  # the layers that decided in C++
                if cpp_log and step.routed_log:
                    raise RuntimeError("mod-serve: routed layers decided both in C++ and in Python in one step")
                step.routed_log = step.routed_log or cpp_log
            self.cpu_ops.clear_step()
        if step is None:
            return
        new = step.new.cpu().numpy()
        totals = step.prior_host + new
        settled = step.settled
        for row, req_id in enumerate(step.req_ids):
            self.counts[req_id] = (int(settled[row]), totals[:, row].copy())
            self.pending_report[req_id] = (int(settled[row]), dict(zip(self.routed_layers, totals[:, row].tolist())))
        if step.crossings is not None:
            self._report_boundaries(step)
        self._trim = totals
        self.totals_routed += new.sum(1)
        self.totals_tokens += step.num_tokens

    def _report_boundaries(self, step: RoutingStep) -> None:
        """r_i(N) at each boundary the step crossed: prior count plus the layer's routed tokens
        of the request up to the boundary's last token (indices are sorted)."""
        rows, bounds, last_token = step.crossings
        if len(step.routed_log) != len(self.routed_layers):
            raise RuntimeError(f"mod-serve: {len(step.routed_log)} routed layers ran, expected {len(self.routed_layers)}")
        device = step.routed_log[0].device
        qsl = self.runner.query_start_loc.cpu[: step.num_reqs + 1].numpy()
        upto = torch.from_numpy(last_token).to(device)
        first = torch.from_numpy(qsl[rows].astype(np.int64)).to(device)
        counts = torch.stack([torch.searchsorted(idx, upto, right=True) - torch.searchsorted(idx, first)
                              for idx in step.routed_log]).cpu().numpy()
        order = self._layer_order  # routed_log is in layer order
        for c, (row, bound) in enumerate(zip(rows.tolist(), bounds.tolist())):
            req_id = step.req_ids[row]
            routed = {self.routed_layers[j]: int(step.prior_host[j, row] + counts[i, c]) for i, j in enumerate(order)}
            self.pending_boundaries.setdefault(req_id, []).append((bound, routed))

    def trim_block_tables(self) -> None:
        """Shorten each request's block-table row of every routed layer to the blocks its routed
        tokens fill, exactly as ``RoutedKVManager.settle`` does on the scheduler side. Rows are
        those of the step just run (the batch is condensed only when the next step starts)."""
        totals, self._trim = self._trim, None
        if totals is None:
            return
        num_rows = totals.shape[1]
        for j, (rows, block_size) in enumerate(self._block_rows()):
            np.minimum(rows[:num_rows], -(-totals[j] // block_size), out=rows[:num_rows])

    def _block_rows(self) -> list[tuple[np.ndarray, int]]:
        """Per routed layer (in slot order): its block table's blocks-per-row array and block size,
        looked up once per input batch."""
        batch = self.runner.input_batch
        if self._rows_of is None or self._rows_of[0] is not batch:
            tables = [batch.block_table[self.group_of_layer[layer]] for layer in self.routed_layers]
            self._rows_of = (batch, [(t.num_blocks_per_row, t.block_size) for t in tables])
        return self._rows_of[1]

    def stats(self) -> dict:
        """Routing totals since start-up and the KV blocks that routed layers hold right now,
        against what the same layers would hold if they were dense."""
        tokens = self.totals_tokens
        out = {
            "routed_tokens": {str(layer): int(n) for layer, n in zip(self.routed_layers, self.totals_routed)},
            "tokens_seen": tokens,
            "routed_fraction": {
                str(layer): (int(n) / tokens if tokens else 0.0) for layer, n in zip(self.routed_layers, self.totals_routed)
            },
        }
        runner = self.runner
        if not self.group_of_layer or runner is None:
            return out
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        routed_gids = set(self.group_of_layer.values())
        held = dense = all_held = 0
        for g, table in enumerate(batch.block_table.block_tables):
            blocks = int(table.num_blocks_per_row[:num_reqs].sum())
            all_held += blocks
            if g in routed_gids:
                held += blocks
                dense += int((-(-computed // table.block_size)).sum())
        total = runner.kv_cache_config.num_blocks
        out.update(routed_kv_blocks=held, dense_equivalent_kv_blocks=dense, total_kv_blocks=total,
                   free_kv_blocks=total - all_held)
        return out
