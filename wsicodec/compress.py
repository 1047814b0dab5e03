"""read -> tile -> tissue -> encode -> quantise -> store.  OWNER: lead."""
