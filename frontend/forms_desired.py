"""Forms of the desired-state pages: the document editor, the reconciler mode, rollback and the
revision to compare a revision against."""

from __future__ import annotations

from django import forms

from compute.desired.models import ReconcileMode

MAX_DOCUMENT_CHARS = 2 * 1024 * 1024  # as the API


class DocumentForm(forms.Form):
    text = forms.CharField(
        label="Document",
        max_length=MAX_DOCUMENT_CHARS,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 24, "spellcheck": "false", "class": "mono"}),
    )
    message = forms.CharField(label="Message", max_length=500, required=False)


class ModeForm(forms.Form):
    mode = forms.ChoiceField(label="Reconciler mode", choices=ReconcileMode.choices)


class RollbackForm(forms.Form):
    message = forms.CharField(label="Message", max_length=500, required=False)


class PlanForm(forms.Form):
    number = forms.IntegerField(label="Revision", min_value=1, required=False)


class CompareForm(forms.Form):
    """?against=<number> on a revision's page: the revision to diff it against (empty: the previous)."""

    against = forms.IntegerField(label="Compare with revision", min_value=1, required=False)
