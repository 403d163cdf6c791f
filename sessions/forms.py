from __future__ import annotations

from django import forms
from django.conf import settings

from sessions.models import Session


class SessionForm(forms.Form):
    task = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6, "placeholder": "Describe the research task for the team…"}),
        strip=True,
        error_messages={"required": "Describe the task for the team."},
    )
    mode = forms.ChoiceField(choices=Session.Mode.choices, initial=Session.Mode.PLANNING_AND_CONTROL)
    title = forms.CharField(max_length=200, required=False, strip=True, help_text="Optional; taken from the task if empty.")

    def clean_task(self) -> str:
        task = self.cleaned_data["task"]
        limit = settings.TASK_MAX_CHARS
        if len(task) > limit:
            raise forms.ValidationError(
                f"The task is {len(task):,} characters long; the limit is {limit:,}. Shorten it or attach data later."
            )
        return task
