"""Approval requests and imported legacy approvals (their models arrive with the approvals work)."""
