"""Moving many tenants, like `terraform plan` / `apply`: capacity arithmetic over the sizes that
`migrator.stamps.sizes` measures (`capacity`), planners that write a reviewable YAML file
(`planners`), and carrying a plan out through the move pipeline (`apply`)."""
