"""Policy: restriction lists with Postfix's vocabulary, access(5), DNS/RBL checks, delegation."""
