"""Configuration: nested dataclasses, loaded from YAML plus ``key=value`` overrides.

Every number of the method is a field here; the defaults are the paper's
(``../shared/reference/cola-paper.md``), and where the authors' code differs the
code's choice is an option. A config crosses into Ray as a plain dict
(:meth:`Config.to_dict`) and is rebuilt on the worker (:meth:`Config.from_dict`).
It never carries runtime state (rank, run ids, resolved paths of a live run).

String values in a YAML file may name environment variables, ``${VAR}`` or
``${VAR:-default}``, so one file serves a laptop and a cluster.

Unknown keys and wrong types fail before any work starts, naming the key::

    cfg = load_config("jobs/configs/smoke.yaml", ["train.lr=3e-4", "resume=true"])
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    """Where the shards are and how pairs are cut from their clips (data workers)."""

    shards: str = ""
    """Folder, glob, single tar, or ``s3://bucket/prefix`` holding ``*.tar`` shards."""
    sample_rate: int = 16000
    segment_samples: int = 15600
    """(96 - 1) * 160 + 400: exactly 96 frames of 25 ms / 10 ms hop at 16 kHz."""
    short_clips: str = "pad"
    """``pad``: zero-pad clips shorter than a segment, centred (authors' code); ``skip``."""
    clip_l2_normalize: bool = True
    """L2-normalise the whole clip before cropping (authors' code; eps 1e-9)."""
    positive_noise_std: float = 0.0
    """Gaussian noise on the positive only; the authors' code uses 0.001."""
    pairs_per_clip: int = 1
    """Independent pairs cut from one decode (1 = the paper)."""
    block_pairs: int = 512
    """Pairs a decode task stacks into one Ray Data block ((block_pairs, S) arrays: 64 MB of
    float32 pairs at 512 x 15600): Ray Data's per-block cost (~8 ms) is paid once per block,
    not per pair. Smaller blocks suit a small object store."""
    transport: str = "int16"
    """How pairs cross Ray's object store: ``int16`` (half the bytes: PCM + a float32 step and
    gain per pair, made float32 on the training device; bit-for-bit today's model input for
    16-bit mono sources at ``sample_rate``, other sources rounded by at most 2^-16 of full scale
    times the clip's L2 gain, counted as ``data/int16_lossy_pairs``) or ``float32`` (exact for
    every source; needed for ``positive_noise_std`` > 0)."""
    decode: str = "full"
    """``full``: decode the whole clip, then crop (exact paper semantics). ``seek``: read only
    the crops' frames (WAV / FLAC / Vorbis at ``sample_rate``; other clips fall back to full);
    same crops for the same seed, but with ``clip_l2_normalize`` the clip norm is estimated
    from the frames read (see ``audio.seek_crop_pairs``)."""
    cache_dir: str = ""
    """Node-local folder for decoded int16 PCM of each shard, reused on later epochs; empty = off.
    When set it takes precedence over ``decode`` (a miss decodes fully to fill the cache)."""
    cache_max_bytes: int = 50 << 30
    """Bound on ``cache_dir`` per node; least-recently-used shards are evicted beyond it."""
    shuffle_buffer: int = 1000
    """Clips held in each training worker's local shuffle buffer (authors' code: 1000)."""
    shuffle_shards: bool = True
    """Visit shards in a fresh random order every epoch."""
    resume_epoch: str = "continue"
    """A resume mid-epoch: ``continue`` delivers exactly the clips that epoch has not trained
    on yet (refused when the checkpoint cannot say which, or names another set of shards);
    ``restart`` starts that epoch's pass over."""
    max_bad_fraction: float = 0.01
    """Error budget: the run fails once bad samples exceed this fraction of samples seen."""
    min_samples_for_budget: int = 200
    """The budget is only judged after this many samples, so one bad clip early is not fatal."""
    decode_num_cpus: float = 1.0
    """CPUs one decode task asks Ray for."""
    decode_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources a decode task asks for (e.g. ``{"decode-node": 0.01}``)."""
    decode_concurrency: int = 0
    """Max decode tasks at once; 0 lets Ray Data decide."""
    s3_endpoint_url: str = ""
    """S3-compatible endpoint; empty means ``AWS_ENDPOINT_URL`` or AWS itself."""
    s3_region: str = ""
    """Region for S3; empty means ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` or us-east-1."""


@dataclass
class FeatureConfig:
    """Log-mel frontend, computed on the training device (never in data workers)."""

    sample_rate: int = 16000
    win_length: int = 400
    hop_length: int = 160
    n_fft: int = 1024
    n_mels: int = 64
    f_min: float = 60.0
    f_max: float = 7800.0
    mel_scale: str = "htk"
    power: float = 1.0
    """1.0 = magnitude spectrum (authors' code), 2.0 = power."""
    log_floor: float = 1e-5
    log_ceiling: float = 1e8
    zero_dc: bool = True
    """Zero the DC bin's mel weights, as the authors' code does."""
    normalize: str = "none"
    """Input normalisation of the log-mel before the encoder: ``none`` (the paper) or
    ``running`` (per mel bin, mean and variance tracked over training batches as batch
    norm's running statistics, used as they are at evaluation). Saved with the encoder."""


BILINEAR_INITS = ("normal", "identity", "zeros")


BILINEAR_SCALES = ("none", "sqrt", "learnable")


def bilinear_scale(value: str, proj_dim: int) -> float | None:
    """``model.bilinear_scale`` -> the fixed multiplier of the bilinear logits, or None for
    ``learnable`` (the model learns it, starting at 1/sqrt(proj_dim)); raises ValueError."""
    if value not in BILINEAR_SCALES:
        raise ValueError(f"one of {', '.join(BILINEAR_SCALES)}, got {value!r}")
    return {"none": 1.0, "sqrt": proj_dim ** -0.5, "learnable": None}[value]


@dataclass
class ModelConfig:
    """Encoder f, projection g, and the similarity."""

    encoder: str = "efficientnet_b0"
    """Any timm model name; built with in_chans=1 and no classifier."""
    global_pool: str = "max"
    drop_path_rate: float = 0.2
    proj_dim: int = 512
    similarity: str = "bilinear"
    """``bilinear`` (g(a)^T W g(p)) or ``cosine`` (divided by ``temperature``)."""
    temperature: float = 0.2
    bilinear_init_std: float = 0.05
    bilinear_init: str = "normal"
    """How W starts: ``normal`` (N(0, bilinear_init_std), the paper), ``identity`` (I: the
    score starts as the dot product of the projections, so positives score highest from
    step 0), ``zeros`` (all logits 0 at step 0)."""
    bilinear_scale: str = "none"
    """Scale of the bilinear logits: ``none`` (the paper), ``sqrt`` (divided by sqrt(proj_dim):
    logits of unit scale at init), ``learnable`` (a learned log-scale, as CLIP's, starting at
    1/sqrt(proj_dim), bounded to at most 100)."""
    gather_negatives: bool = True
    """Positives of every worker are negatives for every anchor (all-gather with grad)."""
    mask_same_clip: bool = True
    """Crops of an anchor's own clip are not its negatives (they meet in a batch only with
    ``data.pairs_per_clip > 1``; at 1, the paper's setting, nothing is masked)."""
    sync_batchnorm: bool = False
    """Batch-norm statistics over all workers (GPU only); default per worker like the paper."""
    channels_last: bool = True
    """channels_last memory format on GPU (ignored on CPU)."""


@dataclass
class TrainConfig:
    """Optimiser, batch, stopping rule, workers and checkpoints."""

    batch_size: int = 1024
    """GLOBAL batch = number of pairs per step = negatives + 1 per anchor; split over workers."""
    lr: float = 1e-4
    bilinear_lr: float = 0.0
    """Adam's learning rate for the bilinear W and its scale (0 = ``lr``): W has proj_dim^2
    entries of scale ``bilinear_init_std``, so at lr 1e-4 it needs ~500 steps to move by its
    own size."""
    weight_decay: float = 0.0
    epochs: int = 500
    max_steps: int = 0
    """Stop after this many optimiser steps in total (0 = run all epochs)."""
    max_minutes: float = 0.0
    """Stop after this many minutes of training in total, resumes included (0 = no time
    limit). Rank 0's clock decides at each log step and every worker stops at that step."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 over this many steps (0 = none, the paper)."""
    lr_decay: str = "none"
    """``none`` (constant, the paper) or ``cosine`` (to 0 at ``max_steps``; needs max_steps)."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    grad_clip: float = 0.0
    seed: int = 0
    """Seeds the model's init, the augmentation draws and each epoch's crops: a shard's crops
    in an epoch are a function of (seed, epoch, shard), whichever worker reads it, however
    often; the order the shards stream in is not fixed."""
    log_every_steps: int = 10
    progress_every_s: float = 30.0
    """Without a terminal (job logs, CI, a file), the driver's progress line is printed at
    most this often (0: at every log step); on a terminal it is rewritten at every log step."""
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3
    max_failures: int = 3
    """Times Ray Train restarts the worker group from the last checkpoint."""
    step_timeout_s: float = 600.0
    """Watchdog: a rank that waits longer than this for its next batch fails the step, naming
    itself (a collective waits twice this); 0 = off (Ray's 30-minute barrier)."""
    compile: str = ""
    """``torch.compile`` the model's forward (log-mel + encoder + head + loss): ``""`` off,
    else the inductor mode (``default``, ``reduce-overhead``, ``max-autotune``); ``eager``
    runs the compile machinery without code generation (a check, not a speed-up).
    Checkpoints hold the plain module's weights either way."""
    pin_memory: bool = True
    """On GPU: pin host batches so Ray's copy to the device is non-blocking (no effect on CPU)."""
    prefetch_batches: int = 1
    """Batches each training worker's iterator prepares ahead of the step (Ray's default 1)."""


@dataclass
class AugmentConfig:
    """Augmentations of the training crops, on the training device, all off by default (the
    paper uses none). Each is drawn per pair from a generator seeded by (train.seed, world
    rank, step), so a run and its resume draw the same ones."""

    gain_db: float = 0.0
    """Random gain, uniform in [-gain_db, +gain_db] dB, on each crop (before the L2-free
    log-mel: loudness is a nuisance the encoder should not key on)."""
    mix_prob: float = 0.0
    """Probability that a crop is mixed with a crop of another clip of the batch ..."""
    mix_min_snr_db: float = 5.0
    mix_max_snr_db: float = 20.0
    """... at an SNR drawn uniformly from [min, max] dB (the crop's own energy over the other's)."""
    noise_prob: float = 0.0
    """Probability of white noise added at an SNR drawn uniformly from [min, max] dB."""
    noise_min_snr_db: float = 10.0
    noise_max_snr_db: float = 30.0
    time_shift: float = 0.0
    """Circular shift of each crop by up to this fraction of its length."""
    freq_mask: int = 0
    """SpecAugment-style frequency masking on the log-mel: up to this many mel bins, one band."""
    time_mask: int = 0
    """SpecAugment-style time masking on the log-mel: up to this many frames, one band."""

    @property
    def active(self) -> bool:
        return any((self.gain_db, self.mix_prob, self.noise_prob, self.time_shift, self.freq_mask,
                    self.time_mask))


@dataclass
class EvalConfig:
    """Online evaluation during pre-training (off by default): every ``every_steps``, the
    current encoder embeds small labelled tasks and a fast probe scores them."""

    every_steps: int = 0
    """0 = off. With ``mode: async`` each evaluation step also writes a checkpoint (kept until
    it is evaluated) that a Ray Train validation task scores."""
    mode: str = "async"
    """``async``: Ray Train's validation (``ray.train.report(..., validation=...)``): a Ray task
    on its own ``num_cpus`` loads the step's checkpoint and evaluates it while training goes
    on; its results reach the MLflow run at that step. ``inline``: world rank 0 evaluates
    between two steps and the other ranks wait at their next collective (no extra
    checkpoint, no extra resources)."""
    num_cpus: float = 1.0
    """CPUs the async evaluation task asks Ray for (its torch threads follow)."""
    num_gpus: float = 0.0
    """GPUs the async evaluation task asks for (0: it embeds on CPU)."""
    timeout_s: float = 900.0
    """An async evaluation that takes longer is cancelled and counted as failed (0 = never):
    one hung evaluation would otherwise hold back every later one and the run's end."""
    tasks: str = ""
    """Task shard folders (``cola-ray tasks prepare``), comma-separated: a folder or s3:// each."""
    split: str = "test"
    """The split scored: ``test`` (the tables' split; a monitor, not a selection criterion) or
    ``validation``. The probe trains on ``train``."""
    max_clips: int = 400
    """At most this many clips per split and task (the first ones read), kept in memory."""
    probe_steps: int = 300
    """Full-batch Adam steps of the probe: a standardised logistic regression."""


@dataclass
class TrackingConfig:
    """MLflow."""

    tracking_uri: str = ""
    """Empty: ``MLFLOW_TRACKING_URI`` or a sqlite store ``./mlflow.db``."""
    experiment: str = "cola-ray"
    log_checkpoints: bool = True
    """Copy each checkpoint into the MLflow run's artifacts too."""
    log_model: bool = True
    """Log the final encoder as an MLflow PyTorch model."""
    registered_model_name: str = ""
    """If set, register the final encoder in the Model Registry under this name."""
    spool_dir: str = ""
    """Rank 0's local spool of MLflow records (delivered in the background, kept while the
    server is down). Empty: ``<storage_path>/<name>/mlflow_spool``, or ``~/.cache/cola-ray/
    mlflow-spool/<name>`` when storage is S3. Use a shared folder on multi-node clusters."""
    flush_timeout_s: float = 60.0
    """At the end of training, how long rank 0 waits for MLflow to take the spooled records;
    what is left stays in the spool for ``cola-ray replay-metrics``."""
    system_metrics: bool = True
    """MLflow system metrics in the run: CPU, memory, disk, network and (with ``nvidia-ml-py``,
    ``pip install 'cola-ray[gpu]'``) each GPU's utilisation and memory, sampled on every node
    by its local rank 0 as ``system/node_<rank>/<name>``. False: none."""
    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metrics samples (MLflow's default)."""


@dataclass
class Config:
    """A whole pre-training job."""

    name: str = ""
    """Run name: the Ray Train run folder and the MLflow run name. Empty: generated."""
    storage_path: str = "./runs"
    """Where Ray Train keeps runs and checkpoints: a folder or ``s3://bucket/prefix``."""
    resume: bool = False
    """Continue the latest run in ``storage_path`` (or the named run)."""
    ray_address: str = ""
    """Ray cluster address; empty means ``RAY_ADDRESS`` or a local Ray started here."""
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # ---- conversions -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        return _build(cls, data, prefix="")

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 1e-4, ...}``: the form logged as MLflow params."""
        out: dict[str, Any] = {}

        def walk(obj: Any, prefix: str) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f"{prefix}{f.name}"
                if dataclasses.is_dataclass(value):
                    walk(value, key + ".")
                else:
                    out[key] = json.dumps(value) if isinstance(value, dict) else value

        walk(self, "")
        return out

    # ---- derived values (pure functions of the config) ----------------------------
    @property
    def per_worker_batch(self) -> int:
        """Pairs per worker per step; the global batch must split evenly."""
        workers = max(1, self.train.num_workers)
        return self.train.batch_size // workers

    def validate(self) -> "Config":
        """Cross-field checks; raises :class:`ConfigError` naming the field."""
        t, d, m, f = self.train, self.data, self.model, self.features
        if t.num_workers < 1:
            raise ConfigError(f"train.num_workers must be >= 1, got {t.num_workers}")
        if t.batch_size < 2 or t.batch_size % t.num_workers:
            raise ConfigError(
                f"train.batch_size={t.batch_size} (global) must be >= 2 and divisible by "
                f"train.num_workers={t.num_workers}"
            )
        if t.epochs < 1 and t.max_steps < 1:
            raise ConfigError("set train.epochs >= 1 or train.max_steps >= 1")
        if d.transport not in ("int16", "float32"):
            raise ConfigError(f"data.transport must be 'int16' or 'float32', got {d.transport!r}")
        if d.transport == "int16" and d.positive_noise_std > 0:
            raise ConfigError(f"data.positive_noise_std={d.positive_noise_std} needs data.transport=float32 "
                              "(the noise is added in the decode task; int16 pairs cannot carry it)")
        if m.similarity not in ("bilinear", "cosine"):
            raise ConfigError(f"model.similarity must be 'bilinear' or 'cosine', got {m.similarity!r}")
        if m.bilinear_init not in BILINEAR_INITS:
            raise ConfigError(f"model.bilinear_init must be one of {', '.join(BILINEAR_INITS)}, got {m.bilinear_init!r}")
        try:
            bilinear_scale(m.bilinear_scale, m.proj_dim)
        except ValueError as e:
            raise ConfigError(f"model.bilinear_scale: {e}") from None
        if m.similarity != "bilinear":
            paper = ModelConfig()
            for key in ("bilinear_init", "bilinear_scale"):
                if getattr(m, key) != getattr(paper, key):
                    raise ConfigError(f"model.{key}={getattr(m, key)!r} needs model.similarity=bilinear "
                                      f"(it is {m.similarity!r})")
            if t.bilinear_lr:
                raise ConfigError(f"train.bilinear_lr needs model.similarity=bilinear (it is {m.similarity!r})")
        if t.max_minutes < 0:
            raise ConfigError(f"train.max_minutes must be >= 0 (0 = no time limit), got {t.max_minutes}")
        if t.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
        if t.lr_decay not in ("none", "cosine"):
            raise ConfigError(f"train.lr_decay must be 'none' or 'cosine', got {t.lr_decay!r}")
        if t.lr_decay == "cosine" and t.max_steps < 1:
            raise ConfigError("train.lr_decay=cosine decays to 0 at train.max_steps: set train.max_steps")
        if f.normalize not in ("none", "running"):
            raise ConfigError(f"features.normalize must be 'none' or 'running', got {f.normalize!r}")
        a = self.augment
        for key in ("mix_prob", "noise_prob"):
            if not 0.0 <= getattr(a, key) <= 1.0:
                raise ConfigError(f"augment.{key} must be in [0, 1], got {getattr(a, key)}")
        for key in ("mix", "noise"):
            lo, hi = getattr(a, f"{key}_min_snr_db"), getattr(a, f"{key}_max_snr_db")
            if lo > hi:
                raise ConfigError(f"augment.{key}_min_snr_db={lo} is above augment.{key}_max_snr_db={hi}")
        if a.gain_db < 0 or not 0.0 <= a.time_shift < 1.0 or a.freq_mask < 0 or a.time_mask < 0:
            raise ConfigError("augment.gain_db, freq_mask and time_mask must be >= 0 and augment.time_shift "
                              f"in [0, 1), got {a.gain_db}, {a.freq_mask}, {a.time_mask}, {a.time_shift}")
        if a.freq_mask >= f.n_mels:
            raise ConfigError(f"augment.freq_mask={a.freq_mask} must be below features.n_mels={f.n_mels}")
        e = self.eval
        if e.every_steps < 0 or (e.every_steps and not e.tasks.strip()):
            raise ConfigError(f"eval.every_steps={e.every_steps} needs eval.tasks (task shard folders, "
                              "comma-separated); 0 turns online evaluation off")
        if e.mode not in ("async", "inline"):
            raise ConfigError(f"eval.mode must be 'async' or 'inline', got {e.mode!r}")
        if e.num_cpus < 0 or e.num_gpus < 0 or e.timeout_s < 0:
            raise ConfigError(f"eval.num_cpus, eval.num_gpus and eval.timeout_s must be >= 0, got "
                              f"{e.num_cpus}, {e.num_gpus}, {e.timeout_s}")
        if e.split not in ("test", "validation"):
            raise ConfigError(f"eval.split must be 'test' or 'validation', got {e.split!r}")
        if e.max_clips < 2 or e.probe_steps < 1:
            raise ConfigError(f"eval.max_clips must be >= 2 and eval.probe_steps >= 1, got {e.max_clips}, "
                              f"{e.probe_steps}")
        if self.tracking.system_metrics and self.tracking.system_metrics_interval_s <= 0:
            raise ConfigError("tracking.system_metrics_interval_s must be > 0, got "
                              f"{self.tracking.system_metrics_interval_s}")
        if t.bilinear_lr < 0:
            raise ConfigError(f"train.bilinear_lr must be >= 0 (0 = train.lr), got {t.bilinear_lr}")
        if d.short_clips not in ("pad", "skip"):
            raise ConfigError(f"data.short_clips must be 'pad' or 'skip', got {d.short_clips!r}")
        if t.prefetch_batches < 0:
            raise ConfigError(f"train.prefetch_batches must be >= 0, got {t.prefetch_batches}")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {t.precision!r}")
        if d.pairs_per_clip < 1:
            raise ConfigError(f"data.pairs_per_clip must be >= 1, got {d.pairs_per_clip}")
        if d.block_pairs < 1:
            raise ConfigError(f"data.block_pairs must be >= 1, got {d.block_pairs}")
        if t.compile not in ("", "default", "reduce-overhead", "max-autotune", "eager"):
            raise ConfigError(f"train.compile must be '' (off), default, reduce-overhead, max-autotune "
                              f"or eager, got {t.compile!r}")
        if d.decode not in ("full", "seek"):
            raise ConfigError(f"data.decode must be 'full' or 'seek', got {d.decode!r}")
        if d.cache_dir and d.cache_max_bytes <= 0:
            raise ConfigError(f"data.cache_max_bytes must be > 0 with a cache_dir, got {d.cache_max_bytes}")
        if not 0.0 <= d.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
        if d.sample_rate != f.sample_rate:
            raise ConfigError(
                f"data.sample_rate={d.sample_rate} and features.sample_rate={f.sample_rate} differ"
            )
        if d.segment_samples < f.win_length:
            raise ConfigError(
                f"data.segment_samples={d.segment_samples} is shorter than one window "
                f"(features.win_length={f.win_length})"
            )
        if t.step_timeout_s < 0:
            raise ConfigError(f"train.step_timeout_s must be >= 0 (0 = off), got {t.step_timeout_s}")
        if d.resume_epoch not in ("continue", "restart"):
            raise ConfigError(f"data.resume_epoch must be 'continue' or 'restart', got {d.resume_epoch!r}")
        if t.progress_every_s < 0:
            raise ConfigError(f"train.progress_every_s must be >= 0 (0 = every log step), got {t.progress_every_s}")
        if t.checkpoint_every_steps < 1 or t.log_every_steps < 1:
            raise ConfigError("train.checkpoint_every_steps and train.log_every_steps must be >= 1")
        return self


def n_frames(features: FeatureConfig, n_samples: int) -> int:
    """Frames the log-mel frontend makes of ``n_samples`` (no centring, no padding)."""
    return 1 + (n_samples - features.win_length) // features.hop_length


# ---- loading ------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or the defaults) and apply ``section.key=value`` overrides."""
    return Config.from_dict(read_settings(path, overrides)).validate()


def read_settings(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML file's mapping (``${VAR:-default}`` expanded), then ``a.b.key=value`` overrides.

    Values of overrides are read as YAML (``epochs=5`` is an int, ``lr_range=[1e-4, 1e-2]``
    a list); dots descend into sections. No key is checked here: the caller knows them.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = _expand_env(loaded, "")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (or section.key=value)")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def expand_env(tree: Any) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a loaded YAML tree.

    A value that is only a reference takes the type YAML gives the expansion; an unset
    variable without a default is a :class:`ConfigError` naming the key.
    """
    return _expand_env(tree, "")


_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(node: Any, key: str) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a loaded YAML tree."""
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{key}{k}.") for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, key) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            if m.group(2) is None:
                raise ConfigError(f"config key '{key.rstrip('.')}' names ${{{m.group(1)}}}, which is not set")
            return m.group(2)
        return value

    expanded = _ENV_REF.sub(sub, node)
    # A value that was only a reference takes the type YAML would give it (numbers, bools).
    return yaml.safe_load(expanded) if expanded != node and _ENV_REF.fullmatch(node) and expanded else expanded


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(known))}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")
