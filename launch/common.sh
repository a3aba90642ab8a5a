# Shared by the launch scripts (sourced, not run): resolve a preset name to its YAML config.
#
# posttrain_config PRESET_OR_PATH
#   prints the config file of PRESET ($POSTTRAIN_ROOT/configs/posttrain/PRESET.yaml) or of an
#   existing .yaml path; otherwise fails, listing the available presets.
posttrain_config() {
    local preset=$1 dir=$POSTTRAIN_ROOT/configs/posttrain
    if [[ $preset == *.yaml && -f $preset ]]; then
        realpath "$preset"
        return
    fi
    if [[ -f $dir/$preset.yaml ]]; then
        realpath "$dir/$preset.yaml"
        return
    fi
    local available=()
    local file
    for file in "$dir"/*.yaml; do
        [[ -e $file ]] && available+=("$(basename "$file" .yaml)")
    done
    echo "error: unknown preset '$preset': no $dir/$preset.yaml" >&2
    echo "available presets: ${available[*]:-(none)}" >&2
    return 2
}
