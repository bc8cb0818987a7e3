"""Agent payments: credentials, wallet policies and grants, the spend ledger, approvals, freezes."""
