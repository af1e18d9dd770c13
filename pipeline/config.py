"""The whole run as pydantic models: YAML in, `dotted.key=value` overrides on top.

Every block that has alternatives names its plug-in with `type:` (a discriminated union), so
swapping a sampler, judge or method is a config edit and adding one is one model plus one union
member. Every model forbids unknown keys: a typo stops the run before any work, with a message
that names the key and the keys allowed there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def Operational(default: Any = ..., **kwargs: Any) -> Any:
    """A field that changes how fast or how robustly a stage works, not what it writes (request
    concurrency, timeouts, cache location, batch size of a judge). It is left out of the stage
    keys (`RunConfig.hash_of`), so raising `judge.concurrency` does not re-run judge, train and
    evaluate."""
    return Field(default, json_schema_extra={"operational": True}, **kwargs)


def InputPath(default: Any = ..., **kwargs: Any) -> Any:
    """A field naming a file or folder the run reads (prompts, a rubric, a model folder). Its
    *content* fingerprint joins the keys of the stages that read it (`RunConfig.input_paths`),
    so editing the file re-runs them even though the config text is unchanged."""
    return Field(default, json_schema_extra={"input_path": True}, **kwargs)


# ── prompts ──────────────────────────────────────────────────────────────────────────────────
class BuiltinMathData(Block):
    """Grade-school arithmetic word problems generated on the fly (`pipeline/data.py`)."""

    type: Literal["builtin_math"] = "builtin_math"
    num_train: int = Field(64, ge=1)
    num_eval: int = Field(32, ge=1)
    levels: list[Literal[1, 2, 3]] = Field(
        [1, 2, 3], min_length=1, description="difficulty levels to draw from (pipeline/data.py: the embedded policy's solve rate per level)"
    )
    templates: list[str] | None = Field(
        None, min_length=1, description="draw from these templates only (names in pipeline/data.py TEMPLATES), instead of "
        "`levels`: a set of whole templates the training never saw is an out-of-domain held-out set"
    )
    seed: int = 0

    @field_validator("templates")
    @classmethod
    def _known_templates(cls, names: list[str] | None) -> list[str] | None:
        from pipeline.data import TEMPLATES

        unknown = [n for n in names or () if n not in TEMPLATES]
        if unknown:
            raise ValueError(f"unknown template(s) {unknown}; known: {', '.join(TEMPLATES)}")
        return names


class FieldMap(Block):
    """Which column of the user's rows holds what. Only `prompt` is required in the rows."""

    prompt: str = "prompt"
    id: str | None = None
    solution: str | None = None
    answer: str | None = None


class FileData(Block):
    """Prompts from a local (or pyarrow-filesystem) `.jsonl` or `.parquet` file."""

    type: Literal["file"] = "file"
    path: str = InputPath()
    eval_path: str | None = InputPath(None)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    fields: FieldMap = FieldMap()
    seed: int = 0
    limit: int | None = Field(None, ge=1)


class HFData(Block):
    """Prompts from an HF `datasets` path (a local folder saved with `save_to_disk`, or a script/hub
    id where the cluster has network)."""

    type: Literal["hf"] = "hf"
    path: str = InputPath()
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    fields: FieldMap = FieldMap()
    seed: int = 0
    limit: int | None = Field(None, ge=1)


DataConfig = Annotated[Union[BuiltinMathData, FileData, HFData], Field(discriminator="type")]

DEFAULT_PROMPT_TEMPLATE = (
    "{prompt}\n\nSolve it step by step. Finish with a last line of the form "
    "'The answer is N.' where N is a number."
)


# ── sample ───────────────────────────────────────────────────────────────────────────────────
class _Sampling(Block):
    """What every sampler shares: how many candidates, how they are drawn, what the model sees."""

    n: int = Field(8, ge=1, description="candidates per prompt (the paper samples 8)")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system_prompt: str | None = None
    seed: int = 0


class VLLMSampler(_Sampling):
    """Ray Data + vLLM (`ray.data.llm`, `stages/sample/vllm.py`). One code path for a CPU laptop
    and a GPU cluster: `replicas` engine copies, each over `tensor_parallel_size` GPUs."""

    type: Literal["vllm"] = "vllm"
    model: str | None = Field(None, description="None: the policy of the round; else embedded:NAME, an HF folder or a hub id")
    batch_size: int = Field(16, ge=1)
    replicas: int = Field(1, ge=1, description="engine copies (Ray Data actors), each over tensor_parallel_size devices")
    tensor_parallel_size: int = Field(1, ge=1)
    accelerator_type: str | None = Field(None, description="Ray accelerator type the engines need, e.g. H100 (GPU only)")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to vllm.LLM as they are (e.g. {max_num_seqs: 64}); they win over the keys above"
    )
    dtype: str = "bfloat16"
    max_model_len: int = Field(1024, ge=16)
    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0, description="on CPU: the share of RAM given to the KV cache"
    )
    enforce_eager: bool = True
    use_gpu: bool = False
    cpu_reserved: int = Field(
        0, ge=0, description="CPU only: cores vLLM leaves to other work (its default, 1, halves a 2-core laptop)"
    )
    engine_log_level: Literal["debug", "info", "warning", "error"] = Operational(
        "error", description="vLLM's own log level in the engine actors; `info` shows engine start-up and throughput"
    )


class HFSampler(_Sampling):
    """Batched transformers `generate` on a Ray Data actor pool (`stages/sample/hf.py`), for models
    vLLM cannot serve (and quick starts: no engine to build)."""

    type: Literal["hf"] = "hf"
    model: str | None = Field(None, description="None: the policy of the round; else embedded:NAME, an HF folder or a hub id")
    batch_size: int = Field(8, ge=1, description="prompts per generate call (each with n sequences); a batch's seed and padding shape its samples")
    workers: int = Operational(1, ge=1, description="Ray Data actors, one model copy each")
    dtype: Literal["float32", "bfloat16"] = "float32"
    use_gpu: bool = Operational(False)


class OpenAISampler(_Sampling):
    """Any OpenAI-compatible chat endpoint (`stages/sample/openai_api.py`), async with bounded
    requests in flight and retries; shares its HTTP client with the OpenAI judge."""

    type: Literal["openai"] = "openai"
    model: str = Field(description="the model as the server names it")
    base_url: str | None = Field(None, description="e.g. http://localhost:8000/v1; None: the client's default")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="the NAME of the environment variable holding the key (never the key); None: no key"
    )
    concurrency: int = Operational(32, ge=1, description="requests in flight at once, over all workers")
    workers: int = Operational(1, ge=1)
    max_requests_per_minute: float | None = Operational(None, gt=0.0)
    timeout: float = Operational(120.0, gt=0.0)
    max_retries: int = Operational(5, ge=0)
    backoff_base: float = Operational(1.0, gt=0.0)
    backoff_max: float = Operational(60.0, gt=0.0)


class ReferenceSampler(Block):
    """The dataset's own worked solutions as candidates (one per prompt): the chosen side of
    scenarios 2 and 4 (`stages/sample/reference.py`). Needs prompts with a `solution`."""

    type: Literal["reference"] = "reference"
    prompt_template: str = Field(DEFAULT_PROMPT_TEMPLATE, description="set by the run: the policy sampler's, so the pair's chat is the policy's")
    system_prompt: str | None = None


SamplerConfig = Annotated[Union[VLLMSampler, HFSampler, OpenAISampler, ReferenceSampler], Field(discriminator="type")]


# ── judge ────────────────────────────────────────────────────────────────────────────────────
class VerifierJudge(Block):
    """Scores math answers 1-5 by checking the final answer with math-verify (`stages/judge/math_rules.py`)."""

    type: Literal["verifier"] = "verifier"
    batch_size: int = Operational(64, ge=1)


class JudgePrices(Block):
    """USD per million tokens, for the cost estimate in the manifest and report (your provider's price list)."""

    prompt_per_million: float = Field(ge=0.0)
    completion_per_million: float = Field(ge=0.0)


class OpenAIJudge(Block):
    """A GPT-4-class model scoring each candidate 1-5 with a rubric, through the official `openai`
    client against any OpenAI-compatible server (OpenAI, Azure, vLLM, SGLang, a proxy).
    `stages/judge/openai.py`; the rubric's placeholders are documented in `stages/judge/rubric.py`."""

    type: Literal["openai"] = "openai"
    model: str = Field(description="the judge model as the server names it, e.g. gpt-4o")
    base_url: str | None = Field(None, description="e.g. http://localhost:8000/v1; None: the client's default (OPENAI_BASE_URL or api.openai.com)")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="the NAME of the environment variable holding the key (never the key); None: no key (a local server)"
    )
    temperature: float = Field(0.0, ge=0.0)
    max_tokens: int = Field(512, ge=1, description="the judge's reasoning plus its score")
    rubric: str = InputPath("configs/rubrics/math_1to5.txt")
    response_format: Literal["json_schema", "text"] = Field(
        "json_schema", description='json_schema: the server constrains the reply to {"reasoning": str, "score": 1..5}; text: "Score: N" is parsed'
    )
    concurrency: int = Operational(64, ge=1, description="requests in flight at once, over all workers")
    workers: int = Operational(1, ge=1, description="Ray Data actors sending requests (each with concurrency/workers in flight)")
    max_requests_per_minute: float | None = Operational(None, gt=0.0, description="client-side rate limit over all workers")
    timeout: float = Operational(60.0, gt=0.0, description="seconds per request before it is abandoned and retried")
    max_retries: int = Operational(5, ge=0, description="retries after the first try (429, 5xx, timeouts, dropped connections, unparseable replies)")
    backoff_base: float = Operational(1.0, gt=0.0, description="seconds; retry k waits uniform(0, min(backoff_max, backoff_base * 2**k)) unless the server sends Retry-After")
    backoff_max: float = Operational(60.0, gt=0.0)
    cache_dir: str | None = Operational(None, description="the judge cache (SQLite); None: <cache root>/judge, the cache root being $PIPELINE_CACHE, $XDG_CACHE_HOME/onpolicy-po or ~/.cache/onpolicy-po")
    prices: JudgePrices | None = Operational(None, description="None: tokens are counted, cost is not estimated")


class RewardModelJudge(Block):
    """An HF sequence-classification reward model scoring (prompt, response) in batches on a Ray
    Data actor pool (`stages/judge/reward_model.py`); the raw reward is kept beside the 1-5 score."""

    type: Literal["reward_model"] = "reward_model"
    model: str = InputPath(description="an HF folder (or a hub id where the cluster has network)")
    thresholds: list[float] | None = Field(
        None, min_length=4, max_length=4,
        description="4 ascending rewards: reward < t[0] → 1, ..., ≥ t[3] → 5; None: score by rank among the prompt's "
        "candidates (best 5, worst 1, the rest spread evenly), which cannot score evaluate's one answer per prompt",
    )
    batch_size: int = Operational(16, ge=1)
    max_length: int = Field(1024, ge=8, description="prompt+response tokens; longer ones are cut from the left")
    dtype: Literal["float32", "bfloat16"] = "float32"
    workers: int = Operational(1, ge=1)
    use_gpu: bool = Operational(False)

    @model_validator(mode="after")
    def _ascending(self) -> "RewardModelJudge":
        t = self.thresholds
        if t is not None and any(b <= a for a, b in zip(t, t[1:])):
            raise ValueError(f"thresholds must be 4 strictly ascending rewards, got {t}")
        return self


JudgeConfig = Annotated[Union[VerifierJudge, OpenAIJudge, RewardModelJudge], Field(discriminator="type")]


# ── pairs ────────────────────────────────────────────────────────────────────────────────────
# Who writes chosen × rejected in each scenario (3D-properties §5.2, METHODS.md): "policy" is the
# round's policy (`sampler`), "reference" the dataset's worked solutions, "other" another model
# (`other_sampler`). Scenario 1 is on-policy on both sides; 4 on neither.
SCENARIO_SOURCES: dict[int, tuple[str, str]] = {
    1: ("policy", "policy"),
    2: ("reference", "policy"),
    3: ("policy", "other"),
    4: ("reference", "other"),
}


class PairsConfig(Block):
    scenarios: list[Literal[1, 2, 3, 4]] = Field(
        [1], min_length=1,
        description="1 = policy × policy, 2 = dataset solution × policy, 3 = policy × other model, 4 = dataset solution × other model",
    )
    tie_break: Literal["first", "random"] = Field(
        "first", description="among equal scores: lowest candidate_id, or a seeded draw per prompt"
    )
    min_margin: float = Field(1.0, gt=0.0, description="drop prompts whose chosen-rejected score gap is below this")
    seed: int = 0

    @model_validator(mode="after")
    def _unique(self) -> "PairsConfig":
        if len(set(self.scenarios)) != len(self.scenarios):
            raise ValueError(f"scenarios must not repeat, got {self.scenarios}")
        return self


# ── train ────────────────────────────────────────────────────────────────────────────────────
# Each method's loss is in stages/train/objectives.py, with its formula; h = (c − c₀) − (r − r₀).
class DPOMethod(Block):
    """DPO (Rafailov et al., 2023): loss = −log σ(β·h)."""

    type: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0)


class IPOMethod(Block):
    """IPO (Azar et al., 2023), length-averaged as TRL: loss = (h̄ − 1/(2β))², β playing τ."""

    type: Literal["ipo"] = "ipo"
    beta: float = Field(0.1, gt=0.0, description="τ: the target per-token margin is 1/(2β)")


class SLiCMethod(Block):
    """SLiC-HF (Zhao et al., 2023): loss = max(0, δ − c + r) − λ·c; `form: hinge` is TRL's
    reference-relative `max(0, 1 − β·h)` instead."""

    type: Literal["slic"] = "slic"
    form: Literal["slic", "hinge"] = Field("slic", description="slic: the paper's, reference-free; hinge: TRL's")
    delta: float = Field(1.0, gt=0.0, description="δ: the margin in nats y+ must beat y− by (form slic)")
    sft_weight: float = Field(0.1, ge=0.0, description="λ: weight of the chosen response's cross-entropy (form slic)")
    beta: float = Field(0.1, gt=0.0, description="β of the hinge form")


class SimPOMethod(Block):
    """SimPO (Meng et al., 2024): loss = −log σ(β·c/|y+| − β·r/|y−| − γ); no reference model."""

    type: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0.0)
    gamma: float = Field(0.5, ge=0.0, description="γ: the target reward margin")


class FlexDPOMethod(Block):
    """Flex-DPO (seed 003 §3.3): loss = −log σ(β+·(c − c₀) − β−·(r − r₀)); a lower β− slows the
    drop of the rejected responses' likelihood."""

    type: Literal["flex_dpo"] = "flex_dpo"
    beta_chosen: float = Field(0.1, gt=0.0, description="β+")
    beta_rejected: float = Field(0.05, gt=0.0, description="β− (paper's best: ≈0.08 on poems, 0.01 on math)")


class DPOSFTMethod(Block):
    """DPO+SFT: loss = −log σ(β·h) + λ·(−c/|y+|), keeping a gradient on y+ as π(y−) → 0."""

    type: Literal["dpo_sft"] = "dpo_sft"
    beta: float = Field(0.1, gt=0.0)
    sft_weight: float = Field(1.0, ge=0.0, description="λ: weight of the chosen response's mean per-token NLL")


class RewardModelMethod(Block):
    """A Bradley–Terry reward model (seed 003 §5.3, RLHF's first step): loss = −log σ(r(x,y+) − r(x,y−))
    with r a one-output sequence-classification head on the policy's backbone. Not a policy: its
    checkpoint is a reward model for `judge: {type: reward_model}`, and evaluate reports its
    accuracy on held-out pairs instead of answers."""

    type: Literal["reward_model"] = "reward_model"
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="TRL's: adds coefficient·mean((r+ + r−)²), rewards centred on 0; None: off"
    )


MethodConfig = Annotated[
    Union[DPOMethod, IPOMethod, SLiCMethod, SimPOMethod, FlexDPOMethod, DPOSFTMethod, RewardModelMethod],
    Field(discriminator="type"),
]


# ── update rules and parameterisations (a method = objective × update rule × parameterisation) ──
class PlainUpdate(Block):
    """Backpropagate the objective's loss (every method's default)."""

    type: Literal["plain"] = "plain"


class OGDUpdate(Block):
    """Orthogonal Gradient Descent (seed 001 §4, `stages/train/ogd.py`): the gradient is
    g_w − max(0, g_w·g_l)/‖g_l‖² · g_l with g_w, g_l the gradients of the mean NLL of the chosen and
    of the rejected responses. No reference model and no hyper-parameter; `method` is then only
    logged, for comparison (the paper plots the DPO loss at β = 0.1 under OGD, Fig. 6)."""

    type: Literal["ogd"] = "ogd"


UpdateConfig = Annotated[Union[PlainUpdate, OGDUpdate], Field(discriminator="type")]


class FullParameterisation(Block):
    """Every weight trains."""

    type: Literal["full"] = "full"


class RoPOParameterisation(Block):
    """RoPO (seed 000, `stages/train/ropo.py`): every weight frozen; each adapted linear layer
    trains Givens angles (a forward and a reverse sweep of `stages` stages each) and a magnitude
    per output neuron, W' = diag(m)·W·Rᵀ, so the angles between neurons (and the hyperspherical
    energy) never change. Merged into plain weights on export."""

    type: Literal["ropo"] = "ropo"
    modules: list[str] = Field(
        ["q_proj", "v_proj"], min_length=1,
        description="names of the linear layers to adapt (the last part of the module name, e.g. q_proj, up_proj)",
    )
    stages: int = Field(2, ge=1, le=16, description="Givens stages per sweep (strides 1, 2, 4, …); angles = stages × in_features per layer")


ParameterisationConfig = Annotated[Union[FullParameterisation, RoPOParameterisation], Field(discriminator="type")]


class GuardConfig(Block):
    """Watch logratios/rejected (logp(y−) − ref_logp(y−) on the step's pairs) and act on a drastic
    drop, once (stages/train/guard.py)."""

    drop_per_step: float | None = Field(2.0, gt=0.0, description="fire when it falls more than this many nats per step, "
                                        "averaged over `window` steps; None: off")  # fmt: skip
    window: int = Field(5, ge=1)
    below_reference: float | None = Field(None, gt=0.0, description="fire when it is below −this many nats; None: off")
    action: Literal["warn", "lower_beta_rejected", "raise_sft_weight"] = Field(
        "warn", description="after the warning: multiply β− by `factor` (dpo, flex_dpo), or set λ to `sft_weight` "
        "(dpo, dpo_sft), for the rest of the run"
    )
    factor: float = Field(0.5, gt=0.0, lt=1.0)
    sft_weight: float = Field(1.0, gt=0.0)


class TrainConfig(Block):
    method: MethodConfig = DPOMethod()
    update: UpdateConfig = Field(PlainUpdate(), description="how the gradient is formed: plain (the method's loss) or ogd")
    parameterisation: ParameterisationConfig = Field(FullParameterisation(), description="what trains: full weights, or ropo")
    guard: GuardConfig | None = Field(None, description="beyond the paper: act on a drastic drop of the rejected log-ratio")
    scenario: Literal[1, 2, 3, 4] = Field(1, description="whose pairs (pairs/s<scenario>) this training reads")
    num_workers: int = Field(2, ge=1, description="Ray Train workers; FSDP2 shards across them")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = Operational(
        None, description="Ray resources each train worker holds (ScalingConfig.resources_per_worker), e.g. "
        "{GPU: 1, CPU: 8} or a custom node label {trainer: 1}; None: one GPU (use_gpu) or the CPU worker's threads"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Operational(
        "PACK", description="how Ray places the workers' bundles over nodes (ScalingConfig.placement_strategy): "
        "PACK fills a node first (NVLink), SPREAD one per node"
    )
    batch_size: int = Field(8, ge=1, description="global batch of pairs per optimiser step")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(5e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="after the warm-up")
    optimizer: Literal["adamw", "rmsprop", "sgd"] = Field("adamw", description="adamw (DPO's), rmsprop (OGD's paper), sgd (plain, no momentum)")
    micro_batch_size: int | None = Field(
        None, ge=1, description="pairs per forward on each worker; gradient accumulation makes up the worker's "
        "share of batch_size (None: the whole share at once)"
    )
    activation_checkpointing: bool = Field(False, description="recompute each layer in backward: less memory, ~1 more forward")
    diagnostics_every: int | None = Field(
        10, ge=1, description="log the chosen and rejected terms' parameter-gradient norms every this many steps "
        "(two extra forward/backward passes each time); None: never"
    )
    grad_clip: float | None = Field(1.0, gt=0.0)
    checkpoint_every: int | None = Field(
        50, ge=1, description="a sharded checkpoint (model, optimiser, scheduler, step) every this many steps: a "
        "worker that dies, or a killed train stage run again, goes on from the last one; None: never"
    )
    max_failures: int = Field(0, ge=0, description="Ray Train restarts after a worker dies (FailureConfig)")
    held_out_pairs: int = Field(
        0, ge=0, description="the scenario's last this many pairs are not trained on; every `eval_every` steps the "
        "method's metrics on them are logged with TRL's eval_ prefix (eval_loss, eval_rewards/accuracies: the "
        "preference accuracy the report plots for every method, reward model included)"
    )
    eval_every: int = Field(1, ge=1, description="steps between held-out evaluations (with held_out_pairs)")
    max_length: int = Field(512, ge=8, description="prompt+response tokens; longer pairs are truncated")
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0

    @property
    def trains_reward_model(self) -> bool:
        """A reward model, not a policy: it answers no prompts and is never sampled from."""
        return self.method.type == "reward_model"

    @property
    def uses_ogd(self) -> bool:
        return self.update.type == "ogd"

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> "TrainConfig":
        if self.trains_reward_model and (self.uses_ogd or self.parameterisation.type != "full"):
            raise ValueError("method reward_model trains a new reward head: it takes update: plain and parameterisation: full")
        if self.uses_ogd and self.guard is not None:
            raise ValueError("guard changes the method's loss, and under update: ogd the loss is only logged: drop `guard`")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers}) "
                "so every worker gets the same share of each global batch"
            )
        if self.guard is not None:
            kind = self.method.type
            if kind == "reward_model":
                raise ValueError("guard watches logp(y−) − ref_logp(y−): a reward model has no log-probs to watch")
            if kind in ("simpo", "slic") and not (kind == "slic" and self.method.form == "hinge"):
                raise ValueError(f"guard watches logp(y−) − ref_logp(y−): method {kind} has no reference model")
            allowed = {"lower_beta_rejected": ("dpo", "flex_dpo"), "raise_sft_weight": ("dpo", "dpo_sft")}
            if self.guard.action in allowed and kind not in allowed[self.guard.action]:
                raise ValueError(f"guard.action {self.guard.action} applies to {' and '.join(allowed[self.guard.action])}, "
                                 f"not {kind}; use action: warn")  # fmt: skip
        share = self.batch_size // self.num_workers
        if self.micro_batch_size is not None and self.micro_batch_size < share and share % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide each worker's share of the batch "
                f"(batch_size / num_workers = {share})"
            )
        return self


# ── evaluate ─────────────────────────────────────────────────────────────────────────────────
class HeldOutSet(Block):
    """One held-out prompt set: the run's own held-out prompts (in-domain), or another prompt
    source's held-out split, e.g. built-in templates the training never drew from (out-of-domain,
    as the paper's second test set). Prompts equal to a training prompt are dropped and counted."""

    data: DataConfig | None = Field(None, description="its prompts (their eval split); None: the run's `data`")
    num_prompts: int | None = Field(None, ge=1, description="at most this many (default: evaluate.num_prompts, else all)")


class ForgettingConfig(Block):
    """Forgetting (TAX, seed 001 §3): small exact-answer tasks the model is not trained on
    (`pipeline/tasks.py`), accuracy before and after training; lm-eval-harness tasks run too when
    the `eval` extra is installed and their data is on disk."""

    tasks: list[str] = Field(["times_table", "unit_conversion", "next_number"], min_length=1,
                             description="built-in task names (pipeline/tasks.py TASKS)")
    num_prompts: int = Field(16, ge=1, description="prompts per task")
    lm_eval: list[str] = Field([], description="lm-eval-harness task names (needs `pip install .[eval]` and local data)")
    include_path: str | None = InputPath(None, description="a folder of lm-eval task YAMLs (custom tasks on local files)")
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, names: list[str]) -> list[str]:
        from pipeline.tasks import TASKS

        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; built in: {', '.join(TASKS)}")
        return names


class EvaluateConfig(Block):
    max_tokens: int = Field(256, ge=1)
    num_prompts: int | None = Field(None, ge=1, description="held-out prompts to judge per set (default: all)")
    logp_pairs: int | None = Field(None, ge=1, description="pairs to measure logps on (default: all)")
    sampler: SamplerConfig | None = Field(
        None, description="what writes the greedy held-out answers (a vllm or hf sampler; n, temperature and max_tokens "
        "are set by evaluate); None: the run's `sampler`"
    )
    sets: dict[str, HeldOutSet] = Field(
        {"in_domain": HeldOutSet()}, min_length=1,
        description="named held-out sets, all answered in one generation pass; the first is the report's headline"
    )
    forgetting: ForgettingConfig | None = Field(ForgettingConfig(), description="None: no forgetting tasks")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of the 95% intervals")

    @field_validator("sets")
    @classmethod
    def _set_names(cls, sets: dict[str, HeldOutSet]) -> dict[str, HeldOutSet]:
        bad = [n for n in sets if not re.fullmatch(r"[A-Za-z0-9_-]+", n) or n == "forgetting"]
        if bad:
            raise ValueError(f"evaluate.sets: {bad[0]!r} is not a usable set name (letters, digits, _ and -; "
                             "not 'forgetting')")
        return sets


# ── variants and rounds ──────────────────────────────────────────────────────────────────────
class NextRoundConfig(Block):
    """How round k+1 follows round k (`rounds` > 1)."""

    sample_from: str | None = Field(
        None, description="the variant whose round-k checkpoint round k+1 samples from and trains; None: the first "
        "variant on scenario 1 (on-policy), else the first variant"
    )
    ref_model: Literal["initial", "previous"] = Field(
        "previous", description="the reference model (π_ref) of round k+1: the run's initial policy, or the checkpoint it "
        "starts from"
    )


class RayConfig(Block):
    address: str | None = Field(None, description="None: RAY_ADDRESS or a new local cluster")
    num_cpus: int | None = Field(None, ge=1)


class RunConfig(Block):
    name: str = "run"
    seed: int = 0
    rounds: int = Field(1, ge=1, description="sample→judge→pairs→train→evaluate repeats, each from the newest checkpoint")
    policy: str = Field("embedded:smollm2-135m-instruct", description="embedded:NAME, an HF folder, or a hub id")
    data: DataConfig = BuiltinMathData()
    sampler: SamplerConfig = VLLMSampler()
    other_sampler: SamplerConfig | None = Field(
        None, description="the other model of scenarios 3 and 4, sampled and judged like the policy (configs/scenarios.yaml)"
    )
    judge: JudgeConfig = VerifierJudge()
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    variants: dict[str, dict[str, Any]] | None = Field(
        None, description="named trainings on the same judged data, each `train` with these keys overridden, e.g. "
        "{s1: {scenario: 1}, ipo: {scenario: 1, method: {type: ipo}}}; None: one per scenario in pairs.scenarios, named s1..s4"
    )
    next_round: NextRoundConfig = NextRoundConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _variants_and_sources(self) -> "RunConfig":
        trains = self.trains()  # validates every variant's overrides
        for name, tc in trains.items():
            if tc.scenario not in self.pairs.scenarios:
                raise ValueError(f"variants.{name}.scenario: scenario {tc.scenario} is not in pairs.scenarios "
                                 f"{self.pairs.scenarios}; add it there or train another scenario")
        frm = self.next_round.sample_from
        if frm is not None and frm not in trains:
            raise ValueError(f"next_round.sample_from: no variant {frm!r}; variants: {', '.join(trains)}")
        policies = list(self.policy_trains())
        if frm is not None and frm not in policies:
            raise ValueError(f"next_round.sample_from: {frm} trains a reward model, which cannot generate; "
                             f"name a policy variant ({', '.join(policies) or 'none in this config'})")
        if self.rounds > 1 and not policies:
            raise ValueError("rounds > 1 samples round k+1 from a trained policy, but every variant trains a reward model")
        if "other" in self.sources() and self.other_sampler is None:
            needing = [k for k in self.pairs.scenarios if "other" in SCENARIO_SOURCES[k]]
            raise ValueError(f"pairs.scenarios {needing} take rejected responses from another model: add an `other_sampler:` "
                             "block (configs/scenarios.yaml has one), or drop scenarios 3 and 4")
        for key in ("sampler", "other_sampler"):
            if isinstance(getattr(self, key), ReferenceSampler):
                raise ValueError(f"{key}.type: `reference` writes the dataset's solutions, not a model's samples; "
                                 "scenarios 2 and 4 use it on their own (pairs.scenarios: [2, 4])")
        if isinstance(self.evaluate.sampler or self.sampler, (OpenAISampler, ReferenceSampler)):
            raise ValueError("evaluate.sampler: evaluation generates from each checkpoint, which an API cannot serve; "
                             "set evaluate.sampler to a vllm or hf sampler (e.g. evaluate.sampler.type=vllm)")
        return self

    # ── parts of a run: sources of candidates, variants of training ──────────────────────────
    def sources(self) -> list[str]:
        """Who writes candidates this run: "policy" always, "reference" for scenarios 2/4, "other" for 3/4."""
        used = {src for k in self.pairs.scenarios for src in SCENARIO_SOURCES[k]}
        return [s for s in ("policy", "reference", "other") if s in used]

    def sampler_of(self, source: str) -> "SamplerConfig":
        if source == "reference":  # solutions answer the chat the policy sees
            return ReferenceSampler(prompt_template=self.sampler.prompt_template, system_prompt=self.sampler.system_prompt)
        return {"policy": self.sampler, "other": self.other_sampler}[source]

    def trains(self) -> dict[str, "TrainConfig"]:
        """Every variant's train config by name, in config order."""
        if self.variants is None:
            return {f"s{k}": self.train.model_copy(update={"scenario": k}) for k in self.pairs.scenarios}
        out = {}
        for name, overrides in self.variants.items():
            if not _VARIANT_NAME.fullmatch(name) or name == "policy":
                raise ValueError(f"variants.{name}: a variant name is a folder name: letters, digits, '.', '_', '-' "
                                 "(and not 'policy', the round's own evaluation)")
            if not isinstance(overrides, dict):
                raise ValueError(f"variants.{name}: expected keys of `train` to override, e.g. {{scenario: 2}}, got {overrides!r}")
            merged = _deep_merge(self.train.model_dump(mode="json"), overrides)
            for block in ("method", "update", "parameterisation"):  # another plug-in: its own defaults, not the base's keys
                if isinstance(overrides.get(block), dict) and "type" in overrides[block]:
                    merged[block] = overrides[block]
            try:
                out[name] = TrainConfig.model_validate(merged)
            except ValidationError as err:
                lines = format_validation_error(err, source="", root=TrainConfig, prefix=f"variants.{name}.").splitlines()[1:]
                raise ValueError("; ".join(line.strip() for line in lines)) from None
        if not out:
            raise ValueError("variants: give at least one, or leave the key out (one per scenario)")
        return out

    def policy_trains(self) -> dict[str, TrainConfig]:
        """The variants that train a policy (they answer prompts), in config order."""
        return {name: tc for name, tc in self.trains().items() if not tc.trains_reward_model}

    def sample_from(self) -> str:
        """The variant whose checkpoint the next round samples from."""
        if self.next_round.sample_from:
            return self.next_round.sample_from
        policies = self.policy_trains() or self.trains()
        return next((n for n, tc in policies.items() if tc.scenario == 1), next(iter(policies)))

    def for_source(self, source: str) -> "RunConfig":
        """This config as the sample and judge stages of one source see it: `sampler` is that source's."""
        return self.model_copy(update={"sampler": self.sampler_of(source)})

    def for_variant(self, name: str) -> "RunConfig":
        """This config as the train and evaluate stages of one variant see it: `train` is the variant's."""
        return self.model_copy(update={"train": self.trains()[name]})

    @model_validator(mode="before")
    @classmethod
    def _defaults_flow_down(cls, raw: Any) -> Any:
        """`sampler: {n: 4}` keeps the default sampler (its `type` filled in), and the top-level
        `seed` is the default of every block's own `seed` (data order, sampling, tie draws,
        batch order): one number makes a run reproducible, a block's own seed still wins."""
        if not isinstance(raw, dict):
            return raw
        raw = copy.deepcopy(raw)
        if "seed" in raw:
            for name in _SEEDED_BLOCKS:
                block = raw.get(name) if (name,) in _NONE_DEFAULT_TYPE else raw.setdefault(name, {})
                if isinstance(block, dict) and block.get("type") != "reference":
                    block.setdefault("seed", raw["seed"])
        for path in _PLUGIN_BLOCKS:
            _default_type(raw, path)
        return raw

    def input_paths(self, *blocks: str) -> dict[str, str]:
        """Every file or folder named in `blocks` (fields declared with `InputPath`), by dotted key."""
        found: dict[str, str] = {}

        def walk(node: Any, prefix: str) -> None:
            if not isinstance(node, BaseModel):
                return
            for name, field in type(node).model_fields.items():
                value = getattr(node, name)
                if (field.json_schema_extra or {}).get("input_path") and value is not None:
                    found[f"{prefix}{name}"] = str(value)
                walk(value, f"{prefix}{name}.")

        for b in blocks:
            walk(getattr(self, b), f"{b}.")
        return found

    def hash_of(self, *blocks: str) -> str:
        """A short stable hash of some top-level blocks: the part of the config a stage depends on."""
        payload = {b: _dump_outcome(getattr(self, b)) for b in blocks}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dump_outcome(value: Any) -> Any:
    """A block as JSON without its `Operational` fields (at any depth)."""
    if not isinstance(value, BaseModel):
        return value
    return {
        name: _dump_outcome(getattr(value, name)) if isinstance(getattr(value, name), BaseModel)
        else value.model_dump(mode="json", include={name})[name]
        for name, field in type(value).model_fields.items()
        if not (field.json_schema_extra or {}).get("operational")
    }


# ── loading ──────────────────────────────────────────────────────────────────────────────────
def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply `a.b.c=value` overrides (values parsed as YAML), validate.

    Any problem raises `UserError` naming the file and key; nothing has run yet.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (pass the path of a YAML file, e.g. configs/default.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for item in overrides:
        _apply_override(raw, item)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        source = f"{path} with overrides {' '.join(overrides)}" if overrides else str(path)
        raise UserError(format_validation_error(err, source=source)) from None


def _default_type(raw: dict, path: tuple[str, ...]) -> None:
    """Fill in the default plug-in's `type` of the block at `path` when the user gave keys only
    (`judge: {scoring: {thresholds: [...]}}` under a reward-model judge: the member the parent's
    own `type` names decides the default)."""
    node: Any = raw
    model: Any = RunConfig
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        model = _member(model.model_fields[part], node)
        if model is None:
            return
    leaf = node.get(path[-1]) if isinstance(node, dict) else None
    field = model.model_fields.get(path[-1])
    if isinstance(leaf, dict) and "type" not in leaf and field is not None:
        if isinstance(field.default, BaseModel):
            leaf["type"] = field.default.type
        elif path in _NONE_DEFAULT_TYPE:
            leaf["type"] = _NONE_DEFAULT_TYPE[path]


def _member(field: Any, raw: Any) -> Any:
    """The model class a raw block validates as: the union member its `type` names, or the default's."""
    tag = raw.get("type") if isinstance(raw, dict) else None
    if tag is None:
        return type(field.default) if isinstance(field.default, BaseModel) else None
    for m in _flatten(getattr(field.annotation, "__args__", ())):
        if isinstance(m, type) and issubclass(m, BaseModel) and m.model_fields.get("type") and m.model_fields["type"].default == tag:
            return m
    return None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r}: write it as dotted.key=value, e.g. train.lr=1e-5")
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a block of keys")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value != "" else None


def format_validation_error(err: ValidationError, source: str, root: type = None, prefix: str = "") -> str:
    """One line per problem, each naming its dotted key (`prefix` + the location under `root`)."""
    root = root or RunConfig
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = [str(p) for i, p in enumerate(e["loc"]) if not _is_union_tag(e["loc"], i)]
        key = prefix + ".".join(loc) if loc else None
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid":
            key = (key or "") + ".type"
            msg = f"unknown type {e['ctx']['tag']!r}; allowed: {e['ctx']['expected_tags']}"
        elif e["type"] == "union_tag_not_found":
            msg = "say which plug-in with a `type:` key"
        elif e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"][:-1], root)
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("value_error",):
            msg = f"{msg} (got {e['input']!r})"
        # a check of the whole config names its keys in its message
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")
    return "\n".join(lines)


def _is_union_tag(loc: tuple, i: int) -> bool:
    # pydantic puts the discriminator value in the loc of a union member ("data.builtin_math.seed").
    return i > 0 and tuple(str(p) for p in loc[:i]) in _PLUGIN_BLOCKS and loc[i] in _UNION_TAGS


def _allowed_keys(loc: tuple, root: type) -> list[str]:
    """The field names of the model at `loc` (walking through union members by their tag)."""
    model: Any = root
    for i, part in enumerate(loc):
        if isinstance(part, int) or _is_union_tag(loc, i):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _model_of(field.annotation, loc)
        if model is None:
            return []
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def _model_of(annotation: Any, loc: tuple) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    # Annotated[Union[A, B], Field(...)] or Optional[A]: look through to the model classes
    members = [a for a in _flatten(getattr(annotation, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
    for m in members:  # pick the member whose tag is in loc
        tag = m.model_fields.get("type")
        if tag is not None and tag.default in loc:
            return m
    return members[0] if len(members) == 1 else None


def _flatten(args: tuple) -> list:
    out = []
    for a in args:
        inner = getattr(a, "__args__", None)
        out.extend(_flatten(inner) if inner else [a])
    return out


# Where a config block picks its plug-in with `type:`.
_PLUGIN_BLOCKS = {("data",), ("sampler",), ("other_sampler",), ("judge",), ("train", "method"), ("train", "update"),
                  ("train", "parameterisation"), ("evaluate", "sampler")}

# Plug-in blocks whose default is None: the type a block given without `type:` gets.
_NONE_DEFAULT_TYPE = {("other_sampler",): "vllm", ("evaluate", "sampler"): "vllm"}

# Blocks with a `seed` of their own, defaulting to the top-level one.
_SEEDED_BLOCKS = ("data", "sampler", "other_sampler", "pairs", "train")

# Every plug-in's tag, e.g. "vllm", "verifier", "dpo": pydantic puts it in error locations.
def _all_blocks(cls: type = Block) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_blocks(sub))]


_UNION_TAGS = {c.model_fields["type"].default for c in _all_blocks() if "type" in c.model_fields}
