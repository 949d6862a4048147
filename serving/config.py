"""``AppConfig``: the one description of a deployment of sdserve.

From it come the Ray Serve config file (``sdserve render-serve-config``), the CLI defaults and, through the
Helm chart's values, the RayService ``serveConfigV2``. Every field has a default and a description.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

if TYPE_CHECKING:
    from models.registry import SnapshotCache

Dtype = Literal["auto", "float16", "bfloat16", "float32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """One servable model in the catalog."""

    name: str = Field(description="Name clients use in the `model` field of a request.", pattern=r"^[\w.\-]+$")
    source: str = Field(
        description="Model reference: file:///path (or a path), s3://bucket/prefix@<version>, hf://org/name@<rev>."
    )
    description: str = Field(default="", description="Free text shown in GET /v1/models.")

    @field_validator("source")
    @classmethod
    def _reference(cls, value: str) -> str:
        from models.registry import RegistryError, parse_ref, source_for

        try:
            source_for(parse_ref(value))
        except RegistryError as exc:
            raise ValueError(str(exc)) from exc
        return value


class ArtifactSpec(ModelSpec):
    """One registry artifact a stage loads by name (an upscaler, a safety checker)."""

    name: str = Field(description="Name clients (or the config) use for it.", pattern=r"^[\w.\-]+$")
    source: str = Field(
        description="Reference: file:///path (or a path), s3://bucket/prefix@<version>, hf://org/name@<rev>."
    )


class ModelCatalog(_Strict):
    """The served models: the part of the config a running application can change in place (`user_config`)."""

    models: list[ModelSpec] = Field(default_factory=list, description="Model catalog; the first is the default.")
    upscalers: list[ArtifactSpec] = Field(
        default_factory=list, description="Upscalers requests may name (`upscale.model`); the first is the default."
    )
    safety_checkers: list[ArtifactSpec] = Field(
        default_factory=list, description="Safety checkers; the first checks images when the safety check is on."
    )
    loras: list[ArtifactSpec] = Field(default_factory=list, description="LoRA adapters requests may name (`loras`).")

    @model_validator(mode="after")
    def _unique(self) -> ModelCatalog:
        for section in type(self).model_fields:
            names = [m.name for m in getattr(self, section)]
            if len(names) != len(set(names)):
                raise ValueError(f"names in {section} must be unique")
        return self


class RegistrySpec(_Strict):
    """Where model snapshots are cached and how they are fetched and rolled out."""

    cache_dir: str | None = Field(
        default=None, description="Snapshot cache folder shared by a node's replicas; unset: $SDSERVE_HOME/snapshots."
    )
    download_attempts: int = Field(default=3, ge=1, le=20, description="Tries per file before a download fails.")
    unsafe_allow_pickle_weights: bool = Field(
        default=False,
        description="UNSAFE: accept pickle-based weights (.bin/.ckpt/.pt/.pth), which can run code when loaded.",
    )
    keep_previous_s: float = Field(
        default=60.0, ge=0, description="Seconds a replaced model version stays loaded after its last request."
    )


class AutoscalingSpec(_Strict):
    """Ray Serve autoscaling for one deployment (used when min_replicas != max_replicas)."""

    min_replicas: int = Field(default=1, ge=0, description="Lower bound on replicas (0 allows scale to zero).")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound on replicas.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at deploy time; min when unset.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Requests per replica (running + queued) the autoscaler aims for."
    )
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Seconds load must stay high before adding.")
    downscale_delay_s: float = Field(default=120.0, ge=0, description="Seconds load must stay low before removing.")
    look_back_period_s: float = Field(default=30.0, gt=0, description="Window the load is averaged over.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ResourceSpec(_Strict):
    """Ray resources one replica reserves (ray_actor_options)."""

    num_cpus: float = Field(default=1.0, ge=0, description="Logical CPUs per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (fractions share a GPU).")
    memory: int | None = Field(default=None, ge=0, description="Bytes of memory to reserve, if set.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. {'sdserve-denoiser': 1} to pin to a group."
    )


class DeploymentSpec(_Strict):
    """Options common to every Serve deployment."""

    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replica count and scaling.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="Per-replica Ray resources.")
    max_ongoing_requests: int = Field(default=16, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Requests waiting per caller for a replica before 503; -1 is unbounded."
    )
    health_check_period_s: float = Field(default=10.0, gt=0, description="Seconds between health checks.")
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0, description="Drain time before a replica stops.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables of this deployment's replicas (Ray runtime_env env_vars) over those "
        "of the Ray worker, e.g. OTEL_* to trace one deployment differently.",
    )

    @model_validator(mode="before")
    @classmethod
    def _partial_resources(cls, data: Any) -> Any:
        # A section's `resources` given in part (e.g. only the custom resource the chart pins) keeps the section's
        # own defaults for the rest, not ResourceSpec's: the decoder's 0.25 CPUs stay 0.25.
        if isinstance(data, dict) and isinstance(data.get("resources"), dict):
            default = cls.model_fields["resources"].get_default(call_default_factory=True)
            data = {**data, "resources": {**default.model_dump(), **data["resources"]}}
        return data


class StageSpec(DeploymentSpec):
    """A model stage: Serve options plus how it runs torch."""

    device: str = Field(default="auto", description="'auto' (CUDA if visible, else CPU), 'cpu', 'cuda', 'cuda:1'.")
    dtype: Dtype = Field(default="auto", description="Weights dtype; 'auto' is fp16 on CUDA, fp32 on CPU.")
    torch_threads: int | None = Field(
        default=None, ge=1, description="Intra-op CPU threads; unset: the replica's reserved CPUs (Ray's default)."
    )


class BatchedStageSpec(StageSpec):
    """A stage that batches requests across callers (Serve's @serve.batch)."""

    max_batch_size: int = Field(default=8, ge=1, description="Most requests the stage computes in one call.")
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, description="How long a batch waits for more requests before it runs."
    )


class TextEncoderSpec(BatchedStageSpec):
    """Text-encoding stage (tokenizer + CLIP)."""

    cache_size: int = Field(default=4096, ge=0, description="Embeddings kept in the LRU cache per model.")
    resources: ResourceSpec = Field(
        default_factory=lambda: ResourceSpec(num_cpus=0.25), description="Per-replica Ray resources."
    )


class DenoiserSpec(StageSpec):
    """Denoising stage (UNet + scheduler loop with step-level batching)."""

    max_batch_size: int = Field(
        default=8, ge=1, description="Most images in one UNet step (requests join and leave between steps)."
    )
    cuda_graphs: bool = Field(
        default=True,
        description="On CUDA, replay the UNet from CUDA graphs (one per padded batch shape) instead of launching "
        "each kernel from Python.",
    )


class DecoderSpec(BatchedStageSpec):
    """Decoding stage (VAE + image encoding)."""

    tile_above_pixels: int = Field(
        default=1024 * 1024, ge=64 * 64, description="Images with more pixels than this are VAE-decoded in tiles."
    )
    resources: ResourceSpec = Field(
        default_factory=lambda: ResourceSpec(num_cpus=0.25), description="Per-replica Ray resources."
    )


class UpscalerSpec(StageSpec):
    """Upscaling stage (Real-ESRGAN models from the catalog's `upscalers`; deployed only when there is one)."""

    tile_size: int = Field(
        default=192, ge=32, description="Input tile side in pixels; larger images are upscaled in overlapping tiles."
    )
    tile_overlap: int = Field(default=16, ge=0, description="Pixels adjacent tiles overlap (blended seams).")
    max_batch_size: int = Field(default=4, ge=1, description="Most equal-size tiles upscaled in one forward pass.")
    resources: ResourceSpec = Field(
        default_factory=lambda: ResourceSpec(num_cpus=0.25), description="Per-replica Ray resources."
    )

    @model_validator(mode="after")
    def _overlap(self) -> UpscalerSpec:
        if self.tile_overlap * 2 >= self.tile_size:
            raise ValueError("upscaler.tile_overlap must be less than half of upscaler.tile_size")
        return self


class LoraSpec(_Strict):
    """Per-request LoRA adapters (the catalog's `loras`), applied by the text encoder and the denoiser."""

    slots: int = Field(
        default=8,
        ge=0,
        le=256,
        description="Adapters each text-encoder and denoiser replica holds on its device at once, in static buffers "
        "of max_rank (rows of one UNet call each use their own); beyond that the least recently used idle adapter "
        "is replaced. 0: no adapter support (and no adapter cost).",
    )
    max_rank: int = Field(default=64, ge=1, le=1024, description="Largest adapter rank accepted; sizes the slots.")
    host_cache_mb: int = Field(
        default=2048, ge=1, description="Converted adapters kept in each replica's host memory, in MiB (an LRU)."
    )
    min_scale: float = Field(default=-2.0, description="Smallest scale a request may give an adapter.")
    max_scale: float = Field(default=2.0, description="Largest scale a request may give an adapter.")

    @model_validator(mode="after")
    def _range(self) -> LoraSpec:
        if self.min_scale > self.max_scale:
            raise ValueError("lora.min_scale must not exceed lora.max_scale")
        return self


SafetyMode = Literal["off", "flag", "block"]
SAFETY_STRICTNESS: dict[str, int] = {"off": 0, "flag": 1, "block": 2}


class SafetySpec(StageSpec):
    """Safety check (diffusers' StableDiffusionSafetyChecker from the catalog's `safety_checkers`)."""

    mode: SafetyMode = Field(
        default="off",
        description="off: no check; flag: every image says whether the checker flagged it; block: flagged images "
        "are withheld (a request whose every image is withheld gets 400 content_policy_violation). Off by default "
        "because the checker's weights are the operator's to choose and pin; a public service should use block.",
    )
    allow_request_off: bool = Field(
        default=False,
        description="Let a request ask for a less strict mode than `mode` (its `safety` field); a stricter one is "
        "always allowed.",
    )
    resources: ResourceSpec = Field(
        default_factory=lambda: ResourceSpec(num_cpus=0.25), description="Per-replica Ray resources."
    )


class IngressSpec(DeploymentSpec):
    """The HTTP ingress (FastAPI)."""

    resources: ResourceSpec = Field(
        default_factory=lambda: ResourceSpec(num_cpus=0.25), description="Per-replica Ray resources."
    )
    max_ongoing_requests: int = Field(default=256, ge=1, description="Requests one replica works on at once.")


class LimitsSpec(_Strict):
    """What a request may ask for; anything outside gets a 422."""

    min_size: int = Field(default=64, ge=8, description="Smallest width / height in pixels.")
    max_size: int = Field(default=1024, ge=8, description="Largest width / height in pixels.")
    max_steps: int = Field(default=150, ge=1, le=1000, description="Most denoising steps per request.")
    max_images: int = Field(default=8, ge=1, description="Largest `n` (images per request).")
    max_prompt_tokens: int = Field(
        default=225, ge=75, description="Longest prompt in CLIP tokens (75 per chunk; longer prompts are chunked)."
    )
    max_guidance_scale: float = Field(default=30.0, ge=0, description="Largest guidance_scale.")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Seconds before a request fails with 504.")
    replica_loss_retries: int = Field(
        default=2, ge=0, le=10, description="Times a request is re-run when a stage replica dies under it."
    )
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After seconds sent with 503 when queues are full.")
    max_output_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        description="Most pixels (width x height) of one returned image, after upscaling.",
    )
    max_upscale_factor: float = Field(default=4.0, gt=1, le=8, description="Largest `upscale.factor`.")
    max_upload_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest uploaded image file (init image, mask) in bytes, before decoding.",
    )
    max_upload_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        description="Most pixels an uploaded image may declare; a larger one (a decompression bomb) is refused "
        "before it is decompressed.",
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest HTTP request body in bytes; a larger one is refused with 413 before it is read whole.",
    )
    max_loras: int = Field(default=4, ge=0, le=16, description="Most LoRA adapters one request may combine.")


class DefaultsSpec(_Strict):
    """Values used when a request leaves a field out."""

    size: str = Field(default="512x512", pattern=r"^\d+x\d+$", description="Default `size` (WIDTHxHEIGHT).")
    steps: int = Field(default=25, ge=1, description="Default denoising steps.")
    guidance_scale: float = Field(default=7.5, ge=0, description="Default classifier-free guidance scale.")
    scheduler: str = Field(default=DEFAULT_SCHEDULER, description="Default scheduler (see GET /v1/schedulers).")
    output_format: Literal["png", "jpeg", "webp"] = Field(default="png", description="Default image file format.")


class OutputSpec(_Strict):
    """Where images returned as `url` are kept."""

    directory: str = Field(default="/tmp/sdserve/outputs", description="Local folder for generated images.")
    store: str | None = Field(
        default=None,
        description="Object store for images instead of the folder, e.g. s3://bucket/images (presigned urls).",
    )
    ttl_s: float = Field(default=3600.0, gt=0, description="Seconds an image stays downloadable.")
    public_base_url: str | None = Field(
        default=None, description="Base of returned urls (e.g. https://img.example.com); the request's host if unset."
    )

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        from serving.outputs import OUTPUT_STORES

        if value is not None and value.split("://", 1)[0] not in OUTPUT_STORES:
            raise ValueError(f"unknown store {value!r}; use one of: {', '.join(f'{s}://' for s in OUTPUT_STORES)}")
        return value


class AuthSpec(_Strict):
    """API keys (see serving/auth.py): off, the service is open to whoever reaches it (and says so)."""

    enabled: bool = Field(default=False, description="Require an API key on every data-plane route and RPC.")
    keys_file: str | None = Field(
        default=None,
        description="YAML key file (`keys: [{id, tenant, sha256}]`; a mounted Secret in the chart), re-read when "
        "it changes.",
    )
    reload_interval_s: float = Field(default=5.0, gt=0, description="How often the key file is checked for changes.")

    @model_validator(mode="after")
    def _needs_keys(self) -> AuthSpec:
        if self.enabled and not self.keys_file:
            raise ValueError("auth.enabled needs auth.keys_file")
        return self


class QuotaSpec(_Strict):
    """What one tenant may use; unset: no limit."""

    requests_per_minute: int | None = Field(default=None, ge=1, description="Generation requests per minute.")
    images_per_day: int | None = Field(default=None, ge=1, description="Images generated per day.")
    compute_per_day: float | None = Field(
        default=None, gt=0, description="Compute per day in megapixel-steps (width x height x steps x images / 1e6)."
    )
    concurrent_requests: int | None = Field(
        default=None, ge=1, description="Generations running at once (jobs included, while they run)."
    )


class QuotasSpec(_Strict):
    """Per-tenant rate limits and quotas, counted in Redis when `jobs.store_url` is a Redis URL (shared by every
    ingress replica), else in memory. A refused request is a 429 before any stage runs."""

    default: QuotaSpec = Field(default_factory=QuotaSpec, description="Every tenant's limits unless listed.")
    tenants: dict[str, QuotaSpec] = Field(default_factory=dict, description="Limits of named tenants.")


class AuditSpec(_Strict):
    """The audit log: one JSON line per API call (see serving/audit.py), to the `sdserve.audit` logger."""

    path: str | None = Field(default=None, description="Also append the lines to this file.")


class JobsSpec(_Strict):
    """Asynchronous jobs (POST /v1/jobs, gRPC GenerateStream): where they are kept and for how long."""

    store_url: str = Field(
        default="memory://",
        description="Job store. memory:// keeps jobs in the ingress replica (lost when it restarts, not shared "
        "between replicas); redis://host:port/db shares them and keeps them across restarts "
        "(password from SDSERVE_REDIS_PASSWORD).",
    )
    ttl_s: float = Field(default=86400.0, gt=0, description="Seconds a job, its events and images are kept.")
    lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A running job whose ingress replica stopped renewing its lease this long ago is failed "
        "with job_lost.",
    )
    key_prefix: str = Field(default="sdserve", description="Prefix of the job store's Redis keys.")
    keepalive_s: float = Field(default=15.0, gt=0, description="Seconds between SSE keep-alive comments.")
    max_running: int = Field(
        default=16,
        ge=1,
        description="Jobs one ingress replica sends to the stages at once; the rest wait in its job queue, first "
        "come first served. The default keeps one denoiser replica busy (its max_ongoing_requests); raise it "
        "with the denoiser's replicas.",
    )
    max_queued: int = Field(
        default=64,
        ge=0,
        description="Jobs waiting in one ingress replica's job queue; beyond that POST /v1/jobs and GenerateStream "
        "answer 503 overloaded (with Retry-After).",
    )
    memory_max_jobs: int = Field(
        default=1000,
        ge=1,
        description="memory:// store: most jobs one ingress replica keeps. The jobs that finished earliest are "
        "dropped first; an unfinished job never is (new jobs get 503 overloaded instead).",
    )
    memory_max_bytes: int = Field(
        default=512 * 2**20,
        ge=2**20,
        description="memory:// store: most bytes of result images, events (previews included) and requests one "
        "ingress replica keeps; dropped like memory_max_jobs.",
    )

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        from serving.jobstore import JOB_STORES

        scheme = urlsplit(value).scheme
        if scheme not in JOB_STORES:
            raise ValueError(f"unknown job store scheme {scheme!r}; use one of {sorted(JOB_STORES)}")
        return value


class GrpcSpec(_Strict):
    """Serve's gRPC proxy (the sdserve.v1 ImageGeneration service, health and reflection)."""

    enabled: bool = Field(default=True, description="Serve gRPC (grpc_options in the Serve config).")
    port: int = Field(default=9000, ge=1, le=65535, description="Listen port of the gRPC proxy.")


class HttpSpec(_Strict):
    """Where Serve's HTTP proxy listens."""

    host: str = Field(default="0.0.0.0", description="Listen address of the HTTP proxy.")
    port: int = Field(default=8000, ge=1, le=65535, description="Listen port of the HTTP proxy.")


class PresetUpscale(_Strict):
    model: str | None = Field(default=None, description="Upscaler name; the first if unset.")
    factor: float = Field(default=2.0, description="Upscale factor.")


class PresetLora(_Strict):
    name: str = Field(description="Adapter name from the catalog's `loras`.")
    scale: float = Field(default=1.0, description="Adapter scale.")


class PresetSpec(_Strict):
    """A style preset: what a request naming it (`style`) gets unless it says otherwise. Every field but `name`
    is optional; request fields override preset fields."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,63}$", description="What requests name in `style`.")
    description: str = Field(default="", description="Shown by GET /v1/styles.")
    prompt: str = Field(
        default="{prompt}", description="Prompt template; `{prompt}` is the request's prompt (appended if absent)."
    )
    negative_prompt: str | None = Field(
        default=None,
        description="Negative prompt; `{prompt}` in it is the request's negative prompt, else the two are joined.",
    )
    model: str | None = Field(default=None, description="Model to use.")
    size: str | None = Field(default=None, pattern=r"^\d+x\d+$", description="Default size (WIDTHxHEIGHT).")
    steps: int | None = Field(default=None, ge=1, description="Default denoising steps.")
    guidance_scale: float | None = Field(default=None, ge=0, description="Default guidance scale.")
    scheduler: str | None = Field(default=None, description="Default scheduler.")
    upscale: PresetUpscale | None = Field(default=None, description="Upscale the images.")
    loras: list[PresetLora] | None = Field(
        default=None, description="LoRA adapters to apply (a request's own `loras` replace them)."
    )

    @model_validator(mode="after")
    def _known_scheduler(self) -> PresetSpec:
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}")
        return self


class StylesSpec(_Strict):
    """Style presets: the built-in ones, the ones listed here, and one YAML file each in `directory`."""

    presets: list[PresetSpec] = Field(default_factory=list, description="Presets defined inline.")
    directory: str | None = Field(
        default=None,
        description="Folder of preset files (`<name>.yaml`, one PresetSpec each; a ConfigMap in the chart). "
        "Changes are picked up without a restart.",
    )
    reload_interval_s: float = Field(
        default=2.0, gt=0, description="How often the preset folder is checked for changes."
    )
    builtin: bool = Field(default=True, description="Serve the built-in presets (vivid, natural, ...).")


class AppConfig(_Strict):
    """Everything that describes one sdserve application."""

    app_name: str = Field(default="sdserve", description="Ray Serve application name.")
    route_prefix: str = Field(default="/", description="HTTP route prefix of the application.")
    models: list[ModelSpec] = Field(default_factory=list, description="Model catalog; the first is the default.")
    stages: list[str] | None = Field(
        default=None,
        description="Stages to deploy (names from the stage table). Unset: every pipeline stage, plus each optional "
        "stage whose catalog section names something; `render-serve-config` and the chart write the list out, "
        "because the catalog itself travels as user_config.",
    )
    http: HttpSpec = Field(default_factory=HttpSpec, description="HTTP proxy settings.")
    grpc: GrpcSpec = Field(default_factory=GrpcSpec, description="gRPC proxy settings.")
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="Ingress deployment.")
    text_encoder: TextEncoderSpec = Field(default_factory=TextEncoderSpec, description="Text-encoding stage.")
    denoiser: DenoiserSpec = Field(default_factory=DenoiserSpec, description="Denoising stage.")
    decoder: DecoderSpec = Field(default_factory=DecoderSpec, description="Decoding stage.")
    upscalers: list[ArtifactSpec] = Field(
        default_factory=list,
        description="Upscalers (Real-ESRGAN safetensors) requests may name; the first is the default. With none, "
        "no upscaler stage is deployed.",
    )
    upscaler: UpscalerSpec = Field(default_factory=UpscalerSpec, description="Upscaling stage.")
    safety_checkers: list[ArtifactSpec] = Field(
        default_factory=list,
        description="Safety checkers; the first one checks images when the safety check is on. With none, no "
        "safety stage is deployed.",
    )
    safety: SafetySpec = Field(default_factory=SafetySpec, description="Safety check.")
    loras: list[ArtifactSpec] = Field(
        default_factory=list,
        description="LoRA adapters (one safetensors file each, kohya / A1111 or diffusers format) requests may name "
        "in `loras` or A1111's `<lora:name:weight>`.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Per-request LoRA adapters.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Request limits.")
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec, description="Request defaults.")
    outputs: OutputSpec = Field(default_factory=OutputSpec, description="Storage for url responses.")
    registry: RegistrySpec = Field(default_factory=RegistrySpec, description="Model snapshot cache and rollout.")
    jobs: JobsSpec = Field(default_factory=JobsSpec, description="Asynchronous jobs.")
    styles: StylesSpec = Field(default_factory=StylesSpec, description="Style presets.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API keys and tenants.")
    audit: AuditSpec = Field(default_factory=AuditSpec, description="Audit log.")
    quotas: QuotasSpec = Field(default_factory=QuotasSpec, description="Rate limits and quotas per tenant.")

    @model_validator(mode="after")
    def _consistent(self) -> AppConfig:
        self.catalog()  # unique names
        if self.stages is not None:
            from serving.stages import STAGES

            unknown = sorted(set(self.stages) - set(STAGES))
            missing = [s.name for s in STAGES.values() if not s.optional and s.name not in self.stages]
            if unknown or missing:
                raise ValueError(f"stages: unknown {unknown}, required but left out {missing}")
        if self.defaults.scheduler not in SCHEDULERS:
            raise ValueError(f"defaults.scheduler must be one of {sorted(SCHEDULERS)}")
        if self.limits.min_size > self.limits.max_size:
            raise ValueError("limits.min_size must not exceed limits.max_size")
        for side in (int(v) for v in self.defaults.size.split("x")):
            if side % 8 or not self.limits.min_size <= side <= self.limits.max_size:
                raise ValueError("defaults.size must be multiples of 8 within limits.min_size-limits.max_size")
        # A default outside the limits would refuse every request that leaves the field out.
        if self.defaults.steps > self.limits.max_steps:
            raise ValueError("defaults.steps must not exceed limits.max_steps")
        if self.defaults.guidance_scale > self.limits.max_guidance_scale:
            raise ValueError("defaults.guidance_scale must not exceed limits.max_guidance_scale")
        return self

    @property
    def default_model(self) -> str | None:
        return self.models[0].name if self.models else None

    @classmethod
    def from_yaml(cls, path: str | Path) -> AppConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)

    def to_args(self) -> dict[str, Any]:
        """The JSON-safe dict passed as `args` to `serving.app:build_app` (the model catalog included)."""
        return self.model_dump(mode="json")

    def catalog(self) -> dict[str, Any]:
        """The deployments' `user_config`: the catalog sections (models and artifacts, one per section the stage
        table names), which change without restarting replicas."""
        from serving.stages import CATALOG_SECTIONS

        sections = {section: getattr(self, section) for section in CATALOG_SECTIONS}
        return ModelCatalog.model_validate(sections).model_dump(mode="json")

    def snapshot_cache(self, home: Path, cache_dir: str | None = None, allow_pickle: bool = False) -> SnapshotCache:
        """The snapshot cache these settings describe (``home``: $SDSERVE_HOME; the arguments override)."""
        from models.registry import SnapshotCache

        registry = self.registry
        root = cache_dir or registry.cache_dir
        return SnapshotCache(
            Path(root).expanduser() if root else home / "snapshots",
            allow_pickle=registry.unsafe_allow_pickle_weights or allow_pickle,
            attempts=registry.download_attempts,
        )


def config_reference(instance: BaseModel | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf setting, for the README's configuration table."""
    instance = instance if instance is not None else AppConfig()
    rows: list[tuple[str, str, str]] = []
    for name, field in type(instance).model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            rows.extend(config_reference(value, f"{key}."))
        else:
            rows.append((key, "unset" if value is None else f"`{value}`", field.description or ""))
    return rows
