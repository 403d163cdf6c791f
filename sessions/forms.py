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
    max_rounds = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=1000,
        label="Round budget",
        help_text="Optional. The run pauses after this many agent turns; Continue gives a fresh budget.",
    )
    auto_continue = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=50,
        initial=0,
        label="Auto-continue",
        help_text="Budgets to continue past without asking (a hard ceiling).",
    )

    approve_code = forms.BooleanField(required=False, label="Ask before running code", help_text="Allow, deny or edit each piece of code before it runs.")
    approve_errors = forms.BooleanField(required=False, label="Ask when code fails", help_text="Retry, skip or abort instead of the team deciding.")
    chat = forms.BooleanField(
        required=False, label="Chat with the team", help_text="Copilot mode: after each answer, the team waits for your next message."
    )

    OPTIONS = ("approve_code", "approve_errors", "chat")

    def clean(self):
        data = super().clean()
        if data.get("chat") and data.get("mode") != Session.Mode.COPILOT:
            self.add_error("chat", "Chat is a copilot-mode option; choose the copilot mode or clear it.")
        if data.get("auto_continue") and not data.get("max_rounds"):
            self.add_error("auto_continue", "Auto-continue counts round budgets: set a Round budget, or leave this at 0.")
        return data

    def session_kwargs(self) -> dict:
        data = self.cleaned_data
        config = {option: True for option in self.OPTIONS if data.get(option)}
        if data.get("max_rounds"):
            config["max_turns"] = data["max_rounds"]
            if data.get("auto_continue"):
                config["auto_continue"] = data["auto_continue"]
        return {"task": data["task"], "mode": data["mode"], "title": data.get("title", ""), "config": config}

    def clean_task(self) -> str:
        task = self.cleaned_data["task"]
        limit = settings.TASK_MAX_CHARS
        if len(task) > limit:
            raise forms.ValidationError(
                f"The task is {len(task):,} characters long; the limit is {limit:,}. Shorten it or attach data later."
            )
        return task


class SessionFilterForm(forms.Form):
    """The session list's filters; an unknown value is ignored rather than an error."""

    q = forms.CharField(required=False, max_length=200, strip=True, label="Search the tasks")
    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *Session.Status.choices])
    mode = forms.ChoiceField(required=False, choices=[("", "Any mode"), *Session.Mode.choices])
