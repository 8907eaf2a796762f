"""Meta-training runs (super-nets and baselines), adaption runs, and the adapted models they produce."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse

from engine.adaption_presets import (
    ADAPTION_PRESETS,
    MAX_SPACE_DEPTHS,
    TOP_FRACTION,
    most_depth_elites,
)  # torch-free
from nasweb.core.models import Job

#: More generations than any preset runs: a larger patience could never stop a search.
MAX_PATIENCE = 1000
#: Elites kept per depth (GAConfig.depth_elites): the most any preset allows (the paper preset:
#: ten of each of four depths and its best 10 leave half of its pool of 100 to children; smaller
#: presets allow fewer, engine.adaption_presets.most_depth_elites).
MAX_DEPTH_ELITES = max(
    most_depth_elites(preset.pool_size, TOP_FRACTION, MAX_SPACE_DEPTHS)
    for preset in ADAPTION_PRESETS.values()
)


class Method(models.TextChoices):
    HMETANAS = "hmetanas", "H-Meta-NAS super-net (MAML++ + progressive shrinking)"
    MAMLPP = "mamlpp", "MAML++ (fixed 4-conv net)"
    MAML = "maml", "MAML (fixed 4-conv net)"
    METANAS = "metanas", "MetaNAS (DARTS + REPTILE, soft-pruning)"


#: Methods whose finished runs an adaption request can start from.
ADAPTABLE_METHODS = (Method.HMETANAS, Method.METANAS)


class MetaTrainingRun(Job):
    job_kind = "metatrain"
    listing_deferred_fields = ("history", "spec", "space")

    name = models.CharField(max_length=120, blank=True)
    method = models.CharField(max_length=16, choices=Method.choices, default=Method.HMETANAS)
    dataset = models.CharField(max_length=32, default="omniglot")
    ways = models.PositiveIntegerField(default=20)
    shots = models.PositiveIntegerField(default=1)
    backbone = models.CharField(max_length=16, default="vgg9")
    preset = models.CharField(max_length=16, default="tiny")
    spec = models.JSONField(help_text="engine.meta.runs.RunSpec, or engine.metanas.service.MetaNasRunSpec")
    out_dir = models.CharField(max_length=500, blank=True)
    #: Progress events, thinned (at most a few thousand points) for the curves.
    history = models.JSONField(default=list, blank=True)
    summary = models.JSONField(null=True, blank=True, help_text="iterations, test accuracy ± CI")
    space = models.JSONField(null=True, blank=True, help_text="SearchSpace.to_dict() of a super-net")

    class Meta(Job.Meta):
        pass

    def celery_route(self) -> tuple[str, str] | None:
        return "runs.meta_train", "train"

    def __str__(self) -> str:
        return self.name or f"Meta-training #{self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("runs:metatrain-detail", args=[self.pk])

    def status_url(self) -> str:
        return reverse("runs:metatrain-json", args=[self.pk])

    @property
    def is_supernet(self) -> bool:
        return self.method == Method.HMETANAS

    @property
    def is_metanas(self) -> bool:
        return self.method == Method.METANAS

    @property
    def is_adaptable(self) -> bool:
        """An adaption request can start from it: an H-Meta-NAS super-net or a MetaNAS meta-state."""
        return self.method in ADAPTABLE_METHODS


class SupportSet(models.Model):
    """A user's labelled images for one task: a zip of class folders (N classes x K images)."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="support_sets")
    name = models.CharField(max_length=120)
    path = models.CharField(max_length=500, help_text="the checked zip under NASWEB_MEDIA_DIR")
    class_names = models.JSONField(default=list)
    images_per_class = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({len(self.class_names)} classes)"


class AdaptionRun(Job):
    job_kind = "adaption"
    listing_deferred_fields = ("history", "result", "request")

    name = models.CharField(max_length=120, blank=True)
    supernet = models.ForeignKey(MetaTrainingRun, on_delete=models.PROTECT, related_name="adaptions")
    device = models.ForeignKey("devices.Device", on_delete=models.PROTECT, related_name="adaptions")
    constraint = models.CharField(max_length=16, default="latency_ms")
    budgets = models.JSONField(help_text="list of budget values (a sweep)")
    preset = models.CharField(max_length=16, default="tiny")
    #: engine.search.evolution.GAConfig.patience: 0 runs every generation of the preset.
    patience = models.PositiveSmallIntegerField(
        default=0, help_text="stop a budget's GA once its elites stood still this many generations (0: never)"
    )
    #: engine.adaption_presets.AdaptionPreset.search_metric and .deepen; "": the preset's.
    search_metric = models.CharField(
        max_length=16, blank=True, default="",
        help_text="what the GA minimises: 'loss' (query loss), 'accuracy' (query error rate); blank: the preset's",
    )  # fmt: skip
    deepen = models.CharField(
        max_length=16, blank=True, default="",
        help_text="what layers a mutation adds hold: 'stored' or 'copy-last'; blank: the preset's",
    )  # fmt: skip
    #: engine.adaption_presets.AdaptionPreset.search_precision; "": the preset's (float32).
    search_precision = models.CharField(
        max_length=16, blank=True, default="",
        help_text="arithmetic of the search's scores: 'float32' or 'bfloat16' (CPU autocast); blank: the preset's",
    )  # fmt: skip
    #: engine.search.evolution.GAConfig.depth_elites; 0: the preset's (every preset: 0, Algorithm 1).
    depth_elites = models.PositiveSmallIntegerField(
        default=0,
        help_text="also keep the best this many sub-nets of every depth among the elites (0: the preset's)",
    )
    support_set = models.ForeignKey(SupportSet, null=True, blank=True, on_delete=models.SET_NULL)
    request = models.JSONField(default=dict, blank=True, help_text="engine.adaption.AdaptionRequest")
    out_dir = models.CharField(max_length=500, blank=True)
    #: Per generation: population points, front, best (thinned).
    history = models.JSONField(default=list, blank=True)
    result = models.JSONField(null=True, blank=True, help_text="AdaptionResult.to_dict()")

    class Meta(Job.Meta):
        pass

    def celery_route(self) -> tuple[str, str] | None:
        return "runs.adapt", "adapt"

    def __str__(self) -> str:
        return self.name or f"Adaption #{self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("runs:adaption-detail", args=[self.pk])

    def status_url(self) -> str:
        return reverse("runs:adaption-json", args=[self.pk])


class AdaptedModel(models.Model):
    run = models.ForeignKey(AdaptionRun, on_delete=models.CASCADE, related_name="models")
    budget = models.FloatField()
    arch = models.JSONField()
    card = models.JSONField()
    torchscript = models.CharField(max_length=500)
    onnx = models.CharField(max_length=500, blank=True)
    card_path = models.CharField(max_length=500)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run", "budget"]

    def __str__(self) -> str:
        return f"Model for {self.run} at {self.budget:g}"

    @property
    def owner_id(self):
        return self.run.owner_id

    @property
    def latency(self) -> dict:
        """The card's latency figures under one set of names, whichever package wrote it.

        A super-net package nests them (``latency_ms``: ``lut_predicted``, ``lut_device`` and
        ``measured_here``, a timing summary whose median is the figure); a MetaNAS package also
        has them flat (``predicted_latency_ms``, ``measured_latency_ms``). ``predicted_ms`` is the
        device's lookup-table sum, ``measured_ms`` the median end-to-end time on this server."""
        card = self.card if isinstance(self.card, dict) else {}
        nested = card.get("latency_ms") if isinstance(card.get("latency_ms"), dict) else {}
        predicted = nested.get("lut_predicted", card.get("predicted_latency_ms"))
        measured = nested.get("measured_here", card.get("measured_latency_ms"))
        if isinstance(measured, dict):
            measured = measured.get("median_ms")
        at_reference = nested.get("measured_at_reference")
        return {
            "predicted_ms": predicted if isinstance(predicted, int | float) else None,
            "lut_device": nested.get("lut_device"),
            "measured_ms": measured if isinstance(measured, int | float) else None,
            # The same timing at the table's reference speed (a table with a speed reference only).
            "measured_at_reference_ms": at_reference if isinstance(at_reference, int | float) else None,
            "note": nested.get("measured_note"),
        }
