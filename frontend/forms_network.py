"""Forms of the network pages. They parse input; compute.network_services validates and does the work."""

from __future__ import annotations

from typing import Any

from django import forms
from django.db.models import QuerySet

from compute.compartments import Protocol
from compute.models import Workload
from tenants.models import dns_label


class CompartmentCreateForm(forms.Form):
    name = forms.CharField(
        max_length=63, validators=[dns_label], help_text="A DNS label, unique in the tenant."
    )
    subnet = forms.CharField(
        max_length=18,
        required=False,
        help_text="CIDR, e.g. 10.210.0.0/24. Empty: the next free block of the pool.",
    )
    nat = forms.BooleanField(required=False, initial=True, label="NAT to the host's uplink")

    def clean_subnet(self) -> str | None:
        return self.cleaned_data["subnet"].strip() or None


class PortPublishForm(forms.Form):
    workload = forms.ModelChoiceField(queryset=Workload.objects.none(), empty_label=None)
    workload_port = forms.IntegerField(min_value=1, max_value=65535, label="Port")
    protocol = forms.ChoiceField(choices=Protocol.choices, initial=Protocol.TCP)
    host_port = forms.IntegerField(
        min_value=1,
        max_value=65535,
        required=False,
        help_text="Empty: the lowest free port of the published range.",
    )

    def __init__(self, *args: Any, workloads: QuerySet[Workload], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["workload"].queryset = workloads  # type: ignore[attr-defined]
