"""Local mail: aliases(5) and writing to mailboxes (the work of Postfix's local(8))."""
