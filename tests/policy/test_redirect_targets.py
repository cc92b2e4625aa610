"""Access-table REDIRECT targets are validated like BCC's: a target that is not
user@domain (Postfix: "requires user@domain target"), that the resolver cannot
resolve, or that holds a control character is logged and ignored, and the mail goes
to its own recipients (Postfix's smtpd_check.c returns DUNNO for it).  Real serve with
its queue manager, an aiosmtpd sink as relayhost."""

from __future__ import annotations

from tests.delivery.test_delivery import send, wait_empty
from tests.peers import Sink

BAD_TARGETS = {"r1@remote.example": "@@", "r2@remote.example": "user@", "r3@remote.example": "nobody",
               "r4@remote.example": "a@exa_mple..org", "r5@remote.example": "x\x1b]0;pwned\x07y@remote.example",
               "r6@remote.example": "\u202euser@remote.example"}


async def test_an_invalid_redirect_target_is_logged_and_ignored(start_mta, caplog, tmp_path):
    access = tmp_path / "access"
    access.write_text("".join(f"{key} REDIRECT {target}\n" for key, target in BAD_TARGETS.items())
                      + "good@remote.example REDIRECT archive@remote.example\n", encoding="utf-8")
    with Sink() as relay:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{relay.port}", mynetworks="127.0.0.1/32",
                              smtpd_recipient_restrictions=f"check_recipient_access texthash:{access}, "
                              "permit_mynetworks")
        for recipient in [*BAD_TARGETS, "good@remote.example"]:
            await send(srv, "a@client.example", [recipient])
        await wait_empty(srv)
        assert sorted(relay.recorder.recipients()) == sorted([*BAD_TARGETS, "archive@remote.example"])
    for target in BAD_TARGETS.values():
        assert f"REDIRECT {target!r} is not a valid address; ignored" in caplog.text
