"""Data-integrity and model-privacy audits (``bastion audit data|backdoor|extraction|privacy``).

Python first::

    from bastion.audit import audit_data, audit_backdoor, audit_extraction, audit_privacy
    report, html, cleaned = audit_data(ds, model, out_dir="out")  # or budget=0.05
"""

from bastion.audit.core import (
    audit_backdoor,
    audit_data,
    audit_extraction,
    audit_privacy,
    poison_dataset,
)
from bastion.audit.reports import (
    BackdoorAuditReport,
    DataAuditReport,
    ExtractionAuditReport,
    PrivacyAuditReport,
    report_schema,
    write_report,
)

__all__ = [
    "BackdoorAuditReport",
    "DataAuditReport",
    "ExtractionAuditReport",
    "PrivacyAuditReport",
    "audit_backdoor",
    "audit_data",
    "audit_extraction",
    "audit_privacy",
    "poison_dataset",
    "report_schema",
    "write_report",
]
