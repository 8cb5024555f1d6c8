"""Moving many tenants, like `terraform plan` / `apply`: measuring tenants and stamps (`sizes`),
planners that write a reviewable YAML file (`planners`), and carrying a plan out through the move
pipeline (`apply`)."""
