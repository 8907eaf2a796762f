from django import forms

PRESET_CHOICES = [
    ("paper", "Full VGG9 search space (2,800 layers, 20 repeats, 20 whole sub-nets checked)"),
    ("tiny", "Tiny preset (36 layers, 5 repeats, 3 sub-nets checked): a quick demo"),
]


class BoardRegistrationForm(forms.Form):
    name = forms.CharField(max_length=120, help_text="e.g. 'Raspberry Pi 4B in lab 2'")
    description = forms.CharField(max_length=2000, required=False, widget=forms.Textarea(attrs={"rows": 3}))
    preset = forms.ChoiceField(choices=PRESET_CHOICES, initial="paper", label="What to profile")


class ProfilingForm(forms.Form):
    repeats = forms.IntegerField(min_value=1, max_value=1000, initial=20)
    warmup = forms.IntegerField(min_value=0, max_value=1000, initial=5)
    accuracy_subnets = forms.IntegerField(
        min_value=0,
        max_value=1000,
        initial=20,
        help_text="random sub-nets timed end to end to check the table",
    )
