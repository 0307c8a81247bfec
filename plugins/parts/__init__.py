"""Parts the built-in methods share; none of these modules is a plugin.

- :mod:`.noprop`: NoProp's label embeddings, noise schedule, continuous-time model and solvers;
- :mod:`.noprop_dt_block`: NoProp-DT's block and cosine schedule;
- :mod:`.noprop_dt_fm`: the parameter checks and embedding setup NoProp-DT and NoProp-FM share;
- :mod:`.ode`: the latent ODE and solver settings of the adjoint method.
"""
