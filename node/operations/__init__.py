"""Operations: structured and audit logs, and the health and metrics endpoint."""
