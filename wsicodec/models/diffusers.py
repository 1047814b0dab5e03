"""(stub) diffusers AutoencoderKL / AutoencoderDC / AutoencoderTiny adapters."""
