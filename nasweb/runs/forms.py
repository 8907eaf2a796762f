from django import forms

from engine.adaption_presets import (  # torch-free, like the web process
    ADAPTION_PRESETS,
    DEEPEN_MODES,
    FINAL_METRICS,
    SEARCH_PRECISIONS,
)
from engine.cpu import bfloat16_flags
from nasweb.runs.models import MAX_DEPTH_ELITES, MAX_PATIENCE, Method

PRESETS = [
    ("tiny", "tiny: seconds (demo)"),
    ("cpu", "cpu: about an hour on 2 cores"),
    ("paper", "paper: the MAML++ protocol (GPU)"),
]
#: What a GA can minimise (engine FINAL_METRICS: a new one fails here until it has a label);
#: "" leaves it to the preset.
SEARCH_METRIC_LABELS = {
    "loss": "few-shot query loss (the paper's Algorithm 1)",
    "accuracy": "few-shot query error rate",
}
SEARCH_METRICS = [("", "the preset's choice")] + [(m, SEARCH_METRIC_LABELS[m]) for m in FINAL_METRICS]
#: What the layers a mutation adds hold (engine DEEPEN_MODES); "" leaves it to the preset.
DEEPEN_LABELS = {
    "stored": "the super-net's stored choices for those layers",
    "copy-last": "copies of the last layer's choices",
}
DEEPEN_CHOICES = [("", "the preset's choice")] + [(m, DEEPEN_LABELS[m]) for m in DEEPEN_MODES]
#: The arithmetic of the search's scores (engine SEARCH_PRECISIONS); "" leaves it to the preset.
SEARCH_PRECISION_LABELS = {
    "float32": "float32",
    "bfloat16": "bfloat16 (faster on CPUs with bfloat16 instructions)",
}
SEARCH_PRECISION_CHOICES = [("", "the preset's choice")] + [
    (p, SEARCH_PRECISION_LABELS[p]) for p in SEARCH_PRECISIONS
]


def _what_each_preset_chooses(field: str) -> str:
    """E.g. "tiny, paper: loss; cpu: accuracy", from the presets themselves (never stale)."""
    presets_by_value: dict[str, list[str]] = {}
    for name, preset in ADAPTION_PRESETS.items():
        presets_by_value.setdefault(getattr(preset, field), []).append(name)
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in presets_by_value.items())


#: The adaption form's and API's help for both choices (one text, so they cannot disagree).
SEARCH_METRIC_HELP = (
    "what the GA minimises on its search tasks: 'loss' (few-shot query loss) or 'accuracy' (query "
    "error rate, which ranked sub-nets by test accuracy better on full super-nets); blank: the "
    f"preset's ({_what_each_preset_chooses('search_metric')})"
)
DEEPEN_HELP = (
    "what the layers a mutation adds hold when it makes a sub-net deeper: 'stored' or 'copy-last'; "
    f"blank: the preset's ({_what_each_preset_chooses('deepen')})"
)
_SERVER_BFLOAT16 = bfloat16_flags()
SEARCH_PRECISION_HELP = (
    "arithmetic of the search's few-shot scores: 'float32' or 'bfloat16' (CPU autocast: 1.3-1.4x "
    "faster per evaluation on a CPU with bfloat16 instructions; in five pairs of budget sweeps on "
    "two super-nets, 15 budgets, it picked a sub-net as accurate as float32's (within 0.01 "
    "points) at 10, a less accurate one at 2 and a more accurate one at 3, so it is an experiment; "
    "the final choice, the accuracy on test tasks and the model stay float32; "
    + (
        f"this server's CPU has {', '.join(_SERVER_BFLOAT16)})"
        if _SERVER_BFLOAT16
        else "this server's CPU has no bfloat16 instructions, so it refuses bfloat16)"
    )
    + f"; blank: the preset's ({_what_each_preset_chooses('search_precision')})"
)
DEPTH_ELITES_HELP = (
    "also keep the best this many sub-nets of every depth among the sub-nets that parent the next "
    "generation, so that a deeper lineage whose first nets score worse is not lost (an experiment: "
    "on one super-net it found better deep nets but picked what the plain search picked, with "
    f"1.4-2.8x the evaluations); 0: the preset's ({_what_each_preset_chooses('depth_elites')})"
)
DATASETS = [
    ("omniglot", "Omniglot"),
    ("mini-imagenet", "Mini-ImageNet"),
    ("cifar-fs", "CIFAR-FS"),
    ("fc100", "FC100"),
]
CONSTRAINTS = [("latency_ms", "latency on the device (ms)"), ("params", "parameters"), ("macs", "MACs")]


class MetaTrainingForm(forms.Form):
    name = forms.CharField(max_length=120, required=False)
    method = forms.ChoiceField(choices=Method.choices, initial=Method.HMETANAS)
    dataset = forms.ChoiceField(
        choices=DATASETS,
        initial="omniglot",
        help_text="Omniglot is downloaded when missing; the others must be in the server's data folder "
        "(docs/DATASETS.md).",
    )
    ways = forms.IntegerField(min_value=2, max_value=50, initial=5)
    shots = forms.IntegerField(min_value=1, max_value=20, initial=1)
    backbone = forms.ChoiceField(
        choices=[("vgg9", "VGG9"), ("resnet12", "ResNet12")], initial="vgg9",
        help_text="the H-Meta-NAS super-net's backbone; MAML/MAML++ use the 4-conv net, MetaNAS its DARTS cells",
    )  # fmt: skip
    preset = forms.ChoiceField(choices=PRESETS, initial="tiny")


class BudgetsField(forms.CharField):
    """'3' or '1, 2.5, 4' (a sweep) -> list of floats."""

    def to_python(self, value):
        import math

        text = super().to_python(value)
        try:
            budgets = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            raise forms.ValidationError(
                "budgets must be numbers separated by commas, e.g. 0.05, 0.1"
            ) from None
        if not budgets:
            raise forms.ValidationError("give at least one budget")
        if len(budgets) > 10:
            raise forms.ValidationError("at most 10 budgets in one sweep")
        bad = [b for b in budgets if not math.isfinite(b) or b <= 0]
        if bad:
            raise forms.ValidationError(f"budgets must be finite and positive: {bad}")
        return sorted(set(budgets))


class AdaptionForm(forms.Form):
    name = forms.CharField(max_length=120, required=False)
    supernet = forms.ModelChoiceField(
        queryset=None, empty_label=None, label="Meta-trained run",
        help_text="an H-Meta-NAS super-net (hardware-aware search) or a MetaNAS run (task-specific DARTS network)",
    )  # fmt: skip
    device = forms.ModelChoiceField(queryset=None, empty_label=None)
    constraint = forms.ChoiceField(choices=CONSTRAINTS, initial="latency_ms")
    budgets = BudgetsField(max_length=200, help_text="one value, or several separated by commas for a sweep")
    preset = forms.ChoiceField(choices=PRESETS, initial="tiny", label="Search preset")
    patience = forms.IntegerField(
        min_value=0, max_value=MAX_PATIENCE, initial=0, required=False, label="Stop early after",
        help_text="generations in a row without a change among the search's best 10 %, after which a "
        "budget's search ends (0: run every generation of the preset)",
    )  # fmt: skip
    search_metric = forms.ChoiceField(
        choices=SEARCH_METRICS, initial="", required=False, label="Search minimises", help_text=SEARCH_METRIC_HELP,
    )  # fmt: skip
    deepen = forms.ChoiceField(
        choices=DEEPEN_CHOICES, initial="", required=False, label="Layers a mutation adds", help_text=DEEPEN_HELP,
    )  # fmt: skip
    search_precision = forms.ChoiceField(
        choices=SEARCH_PRECISION_CHOICES, initial="", required=False, label="Search arithmetic",
        help_text=SEARCH_PRECISION_HELP,
    )  # fmt: skip
    depth_elites = forms.IntegerField(
        min_value=0, max_value=MAX_DEPTH_ELITES, initial=0, required=False, label="Elites of every depth",
        help_text=DEPTH_ELITES_HELP,
    )  # fmt: skip
    support_zip = forms.FileField(
        required=False, label="Support set (optional)",
        help_text="a zip of class folders, one per class, for fine-tuning; else the validation tasks are used",
    )  # fmt: skip

    def __init__(self, *args, supernets, devices, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["supernet"].queryset = supernets
        self.fields["device"].queryset = devices

    def clean_patience(self) -> int:
        return self.cleaned_data.get("patience") or 0  # blank: never stop early

    def clean_depth_elites(self) -> int:
        return self.cleaned_data.get("depth_elites") or 0  # blank: the preset's
