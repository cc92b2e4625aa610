"""Local mail, the work of Postfix's local(8): the agent (agent.py), aliases(5)
(aliases.py), mailboxes (mailbox.py), ``|command`` targets (command.py), whose
rights a file or command runs with (identity.py), the child that writes as that
user (filewriter.py), and the root helper of a serve run as mail_owner
(roothelper.py) with serve's side of it (privileged.py)."""
