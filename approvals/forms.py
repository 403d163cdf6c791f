from __future__ import annotations

from django import forms

from approvals.models import Door


class DecideForm(forms.Form):
    decision = forms.CharField(max_length=20)
    feedback = forms.CharField(required=False, max_length=4000, strip=True)
    steps = forms.CharField(required=False, max_length=20_000)
    code = forms.CharField(required=False, max_length=50_000, strip=False)
    door = forms.ChoiceField(choices=[(Door.SESSION_PAGE, "Session page"), (Door.STAFF_QUEUE, "Staff queue")], required=False)

    def edits(self) -> dict:
        data = self.cleaned_data
        if data["decision"] != "edit":
            return {}
        if data.get("code"):
            return {"code": data["code"]}
        steps = []
        for line in (data.get("steps") or "").splitlines():
            line = line.strip()
            if not line:
                continue
            agent, closed, description = line.partition("]")
            steps.append({"agent": agent.strip(" ["), "description": description.strip()} if closed and line.startswith("[") else {"description": line})
        return {"steps": steps}
