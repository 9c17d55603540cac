"""pdcbdm: PD-CBDM, class-balancing diffusion with a perceptual-distinguish loss and timestep-dependent
self-attention."""
