"""Config's parameters as typed attributes: generated from the registry, do not edit.

``python -m trimail.config.generate`` writes this file from
``trimail.config.registry``; ``tests/config/test_generated.py`` fails when it is
out of date.  ``Config`` inherits these annotations, so mypy and IDEs know that
``config.smtpd_timeout`` is a float and that ``config.smtpd_timout`` does not
exist.  They are annotations only (no class attributes): a read still goes
through ``Config.__getattr__`` the first time, which parses the value and keeps
it on the instance.

Parameters: none read (this file only declares them).
"""

from __future__ import annotations

import ipaddress

from trimail.config.values import Feedback, ListenAddress


class TypedParameters:
    """One annotation per registry parameter, in registry order."""

    myhostname: str
    mydomain: str
    myorigin: str
    mydestination: list[str]
    mail_name: str
    smtpd_banner: str
    mynetworks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    relay_domains: list[str]
    fast_flush_domains: list[str]
    relay_recipient_maps: list[str]
    relay_transport: str
    local_transport: str
    relayhost: str
    default_transport: str
    transport_maps: list[str]
    dns_nameservers: list[ListenAddress]
    dns_concurrency_limit: int
    alias_maps: list[str]
    alias_database: list[str]
    virtual_alias_maps: list[str]
    virtual_alias_domains: list[str]
    virtual_mailbox_domains: list[str]
    virtual_mailbox_maps: list[str]
    virtual_transport: str
    virtual_mailbox_base: str
    virtual_uid_maps: list[str]
    virtual_gid_maps: list[str]
    virtual_minimum_uid: int
    smtpd_reject_unlisted_recipient: bool
    unknown_local_recipient_reject_code: int
    unknown_virtual_alias_reject_code: int
    unknown_virtual_mailbox_reject_code: int
    unknown_relay_recipient_reject_code: int
    local_recipient_maps: list[str]
    recipient_delimiter: str
    mail_spool_directory: str
    home_mailbox: str
    append_at_myorigin: bool
    append_dot_mydomain: bool
    allow_mail_to_commands: list[str]
    allow_mail_to_files: list[str]
    command_time_limit: float
    default_privs: str
    local_destination_concurrency_limit: int
    mailbox_delivery_lock: list[str]
    deliver_lock_attempts: int
    deliver_lock_delay: float
    stale_lock_time: float
    table_lookup_timeout: float
    masquerade_domains: list[str]
    masquerade_exceptions: list[str]
    masquerade_classes: list[str]
    local_header_rewrite_clients: list[str]
    remote_header_rewrite_domain: str
    queue_directory: str
    queue_busy_timeout: float
    queue_minfree: int
    mail_owner: str
    authorized_mailq_users: list[str]
    authorized_flush_users: list[str]
    authorized_submit_users: list[str]
    allow_root: bool
    chroot: bool
    minimal_backoff_time: float
    maximal_backoff_time: float
    maximal_queue_lifetime: float
    bounce_queue_lifetime: float
    bounce_size_limit: int
    queue_run_delay: float
    qmgr_message_active_limit: int
    qmgr_message_recipient_limit: int
    qmgr_destination_active_share: int
    default_destination_recipient_limit: int
    smtp_destination_recipient_limit: int
    relay_destination_recipient_limit: int
    default_process_limit: int
    default_destination_concurrency_limit: int
    smtp_destination_concurrency_limit: int
    relay_destination_concurrency_limit: int
    initial_destination_concurrency: int
    default_destination_concurrency_positive_feedback: Feedback
    default_destination_concurrency_negative_feedback: Feedback
    default_destination_concurrency_failed_cohort_limit: int
    smtp_initial_destination_concurrency: int
    smtp_destination_concurrency_positive_feedback: Feedback
    smtp_destination_concurrency_negative_feedback: Feedback
    smtp_destination_concurrency_failed_cohort_limit: int
    relay_initial_destination_concurrency: int
    relay_destination_concurrency_positive_feedback: Feedback
    relay_destination_concurrency_negative_feedback: Feedback
    relay_destination_concurrency_failed_cohort_limit: int
    delay_warning_time: float
    hopcount_limit: int
    duplicate_filter_limit: int
    smtpd_listen: list[ListenAddress]
    submission_listen: list[ListenAddress]
    smtps_listen: list[ListenAddress]
    metrics_listen: list[ListenAddress]
    message_size_limit: int
    line_length_limit: int
    smtpd_recipient_limit: int
    smtpd_timeout: float
    smtpd_per_record_deadline: bool
    smtpd_hard_error_limit: int
    smtpd_junk_command_limit: int
    stress: str
    smtpd_stress_threshold: int
    smtpd_soft_error_limit: int
    smtpd_error_sleep_time: float
    smtpd_forbid_bare_newline: str
    smtpd_forbid_bare_newline_reject_code: int
    smtpd_forbid_bare_newline_exclusions: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    cleanup_replace_stray_cr_lf: bool
    smtpd_forbidden_commands: list[str]
    smtpd_client_connection_count_limit: int
    smtpd_process_limit: int
    smtpd_workers: int
    master_service_disable: list[str]
    smtpd_session_deadline: float
    smtpd_client_connection_rate_limit: int
    smtpd_greet_pause: float
    header_size_limit: int
    maillog_file: str
    syslog_facility: str
    graceful_timeout: float
    disable_vrfy_command: bool
    smtputf8_enable: bool
    smtpd_discard_ehlo_keywords: list[str]
    smtpd_client_restrictions: list[str]
    smtpd_helo_restrictions: list[str]
    smtpd_sender_restrictions: list[str]
    smtpd_relay_restrictions: list[str]
    smtpd_recipient_restrictions: list[str]
    smtpd_data_restrictions: list[str]
    smtpd_end_of_data_restrictions: list[str]
    smtpd_etrn_restrictions: list[str]
    smtpd_delay_reject: bool
    smtpd_helo_required: bool
    smtpd_peername_lookup: bool
    smtpd_recipient_overshoot_limit: int
    parent_domain_matches_subdomains: list[str]
    allow_percent_hack: bool
    swap_bangpath: bool
    resolve_dequoted_address: bool
    resolve_null_domain: bool
    smtpd_policy_service_timeout: float
    smtpd_policy_service_default_action: str
    plaintext_reject_code: int
    unknown_client_reject_code: int
    unknown_hostname_reject_code: int
    multi_recipient_bounce_reject_code: int
    relay_clientcerts: list[str]
    address_verify_sender: str
    address_verify_map: str
    address_verify_positive_expire_time: float
    address_verify_positive_refresh_time: float
    address_verify_negative_expire_time: float
    address_verify_negative_cache: bool
    address_verify_negative_refresh_time: float
    address_verify_cache_cleanup_interval: float
    address_verify_poll_count: int
    address_verify_poll_delay: float
    address_verify_cache_size: int
    unverified_recipient_reject_code: int
    unverified_recipient_defer_code: int
    unverified_recipient_tempfail_action: str
    unverified_recipient_reject_reason: str
    smtpd_tls_cert_file: str
    smtpd_sasl_auth_enable: bool
    smtpd_tls_auth_only: bool
    smtpd_sasl_password_file: str
    smtpd_auth_failure_limit: int
    smtpd_sender_login_maps: list[str]
    smtpd_tls_handshake_timeout: float
    smtpd_tls_key_file: str
    smtpd_tls_security_level: str
    smtpd_authentication_checks: list[str]
    smtpd_authentication_timeout: float
    smtpd_spf_reject: list[str]
    smtpd_dmarc_reject: bool
    smtpd_dmarc_quarantine: str
    dkim_signing_table: list[str]
    dkim_key_table: list[str]
    smtp_connect_timeout: float
    smtp_helo_timeout: float
    smtp_mail_timeout: float
    smtp_rcpt_timeout: float
    smtp_data_init_timeout: float
    smtp_data_xfer_timeout: float
    smtp_data_done_timeout: float
    smtp_quit_timeout: float
    smtp_connection_cache_time_limit: float
    smtp_connection_reuse_time_limit: float
    smtp_mx_address_limit: int
    smtp_mx_session_limit: int
    smtp_line_length_limit: int
    disable_mime_output_conversion: bool
    proxy_interfaces: list[str]
    smtp_tls_security_level: str
    smtp_tls_CAfile: str
    content_filter: str
    receive_override_options: frozenset[str]
    header_checks: list[str]
    mime_header_checks: list[str]
    nested_header_checks: list[str]
    body_checks: list[str]
    body_checks_size_limit: int
    reinject_listen: list[ListenAddress]
    reinject_overrides: dict[str, str]
    smtpd_milters: list[str]
    non_smtpd_milters: list[str]
    milter_protocol: str
    milter_default_action: str
    milter_connect_timeout: float
    milter_command_timeout: float
    milter_content_timeout: float
    milter_macro_daemon_name: str
    milter_macro_v: str
    milter_connect_macros: list[str]
    milter_helo_macros: list[str]
    milter_mail_macros: list[str]
    milter_rcpt_macros: list[str]
    milter_data_macros: list[str]
    milter_end_of_header_macros: list[str]
    milter_end_of_data_macros: list[str]
