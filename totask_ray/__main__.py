from totask_ray.cli import main

main()
