"""Mail authentication: SPF (spf.py, spfrecord.py), DKIM verification (dkimverify.py),
DMARC (dmarc.py), the Authentication-Results header (results.py), what the SMTP
server does with them (inbound.py) and outbound DKIM signing (signing.py).

Parameters: smtpd_authentication_checks, smtpd_authentication_timeout, smtpd_spf_reject,
smtpd_dmarc_reject, smtpd_dmarc_quarantine, dkim_signing_table, dkim_key_table (read by inbound.py).
"""
