from django import forms

from devices.models import ProfilingJob

PRESET_CHOICES = [
    ("paper", "Full VGG9 search space (2,800 layers, 20 repeats, 20 whole sub-nets checked)"),
    ("tiny", "Tiny preset (36 layers, 5 repeats, 3 sub-nets checked): a quick demo"),
]


def speed_reference_field() -> forms.BooleanField:
    return forms.BooleanField(
        required=False,
        initial=True,
        label="Time against a speed reference",
        help_text=ProfilingJob._meta.get_field("speed_reference").help_text,
    )


class BoardRegistrationForm(forms.Form):
    name = forms.CharField(max_length=120, help_text="e.g. 'Raspberry Pi 4B in lab 2'")
    description = forms.CharField(max_length=2000, required=False, widget=forms.Textarea(attrs={"rows": 3}))
    preset = forms.ChoiceField(choices=PRESET_CHOICES, initial="paper", label="What to profile")
    speed_reference = speed_reference_field()


class ProfilingForm(forms.Form):
    space = forms.ChoiceField(
        label="Search space",
        choices=(),
        required=False,
        help_text="left out: the space of the newest table (the default space for a new device)",
    )
    repeats = forms.IntegerField(min_value=1, max_value=1000, initial=20)
    warmup = forms.IntegerField(min_value=0, max_value=1000, initial=5)
    accuracy_subnets = forms.IntegerField(
        min_value=0,
        max_value=1000,
        initial=20,
        help_text="random sub-nets timed end to end to check the table",
    )
    speed_reference = speed_reference_field()
    context_repeats = forms.IntegerField(
        min_value=0,
        max_value=10,
        initial=2,
        required=False,
        label="Chains per layer (in context)",
        help_text=ProfilingJob._meta.get_field("context_repeats").help_text,
    )

    def __init__(
        self, *args, space_choices: list[tuple[str, str, dict]], times_in_context: bool = True, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        if not times_in_context:  # boards, GPUs, simulators: a setting they would ignore
            del self.fields["context_repeats"]
        self._spaces = {key: space for key, _, space in space_choices}
        self.fields["space"].choices = [(key, label) for key, label, _ in space_choices]
        if space_choices:
            self.fields["space"].initial = space_choices[0][0]

    def clean_context_repeats(self) -> int:
        value = self.cleaned_data["context_repeats"]
        return self.fields["context_repeats"].initial if value is None else value

    def clean_space(self) -> str:
        return self.cleaned_data["space"] or self.fields["space"].initial

    def space_dict(self) -> dict:
        """The chosen space's dict (only after is_valid())."""
        return self._spaces[self.cleaned_data["space"]]
