# Sourced (via BASH_ENV) by every session shell before it reads its first command.
# It defines the daemon's wrapper; execd/shell.py writes one line per run that calls it:
#   { \__execd_pre SEQ PRELUDE; } 2>/dev/null; \__execd_rc PREV && \builtin source CODE <IN; { \__execd_post; } 2>/dev/null
# Every function ends with `return 0` and uses ${v-}, because the user's `set -e` / `set -u` persist.
unset BASH_ENV
__execd_dir=$__EXECD_DIR
unset __EXECD_DIR
shopt -s expand_aliases   # aliases work as they do at a prompt
declare -gA __execd_saved_values=() __execd_saved_attrs=()
__execd_seq=
__execd_intr=
__execd_user_debug=
__execd_user_extdebug=

# Hands a status back as $? so the user's code starts with the previous run's $?.
__execd_rc() { return "$1"; }

# Per-run env: remember the old value, export flag and unset-ness, then export the new value.
__execd_setenv() {
  if [[ -v $1 ]]; then
    __execd_saved_values[$1]=${!1}
    __execd_saved_attrs[$1]="set:${!1@a}"
  else
    __execd_saved_attrs[$1]=unset
  fi
  export "$1=$2"
  return 0
}

__execd_restore_env() {
  local name attrs
  for name in "${!__execd_saved_attrs[@]}"; do
    attrs=${__execd_saved_attrs[$name]}
    if [[ $attrs == unset ]]; then
      unset "$name"
    else
      export -n "$name"
      builtin printf -v "$name" '%s' "${__execd_saved_values[$name]}"
      [[ $attrs == *x* ]] && export "$name"
    fi
  done
  __execd_saved_values=()
  __execd_saved_attrs=()
  return 0
}

# The daemon writes "SEQ SIGNAL" to $__execd_dir/interrupt, then sends SIGUSR2. The interrupt only
# counts for the run it names, so a late signal never stops the next run.
__execd_check_interrupt() {
  local IFS=$' \t\n' seq sig
  { builtin read -r seq sig <"$__execd_dir/interrupt"; } 2>/dev/null || return 0
  [[ -n $__execd_seq && $seq == "$__execd_seq" && -z $__execd_intr ]] || return 0
  __execd_intr=$sig
  if [[ $sig == INT ]]; then __execd_run_user_int_trap; fi
  # From here on every command of the user's code returns at once (extdebug: DEBUG status 2 = return).
  __execd_user_debug=$(trap -p DEBUG)
  if shopt -q extdebug; then __execd_user_extdebug=1; else __execd_user_extdebug=; fi
  shopt -s extdebug
  trap '\__execd_unwind' DEBUG
  return 0
}

__execd_run_user_int_trap() {
  local handler
  handler=$(trap -p INT)
  [[ -n $handler ]] || return 0
  eval "set -- $handler"
  [[ -n ${3-} ]] && eval "$3"
  return 0
}

__execd_unwind() {
  if [[ -n $__execd_intr ]] && (( ${#FUNCNAME[@]} > 1 )) && [[ ${FUNCNAME[1]} != __execd_* ]]; then
    return 2
  fi
  return 0
}

__execd_clear_interrupt() {
  [[ -n $__execd_intr ]] || return 0
  __execd_intr=
  trap - DEBUG
  [[ -n $__execd_user_debug ]] && eval "$__execd_user_debug"
  [[ -n $__execd_user_extdebug ]] || shopt -u extdebug
  return 0
}

__execd_pre() {
  __execd_seq=$1
  [[ $2 == 1 ]] && builtin source "$__execd_dir/prelude"
  [[ -e $__execd_dir/interrupt ]] && __execd_check_interrupt
  return 0
}

# Reports "SEQ STATUS FLAGS PWD" (NUL-terminated) on the private FIFO that only the daemon reads.
__execd_post() {
  local status=$? flags=$-
  set +xv
  __execd_restore_env
  __execd_clear_interrupt
  builtin printf '%s\t%s\t%s\t%s\0' "$__execd_seq" "$status" "$flags" "$PWD" >|"$__execd_dir/status"
  __execd_seq=
  return 0
}

trap '\__execd_check_interrupt' USR2
[[ -n ${__EXECD_NOFILE-} ]] && ulimit -Sn "$__EXECD_NOFILE" 2>/dev/null
builtin cd -- "$__EXECD_CWD" || exit 97
unset __EXECD_CWD __EXECD_NOFILE
builtin printf '%s\t%s\t%s\t%s\0' ready 0 "$-" "$PWD" >|"$__execd_dir/status"
