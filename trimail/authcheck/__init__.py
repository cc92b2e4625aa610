"""Mail authentication: SPF (spf.py, spfrecord.py), DKIM verification (dkimverify.py),
DMARC (dmarc.py), the Authentication-Results header (results.py), what the SMTP
server does with them (inbound.py) and outbound DKIM signing (signing.py).

Parameters: see trimail/config/params_auth.py.
"""
